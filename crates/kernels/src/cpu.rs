//! The f32 CPU kernels behind [`super::Kernels`] on burn-flex, on plain NCHW slices.
//!
//! burn-flex has no convolution backward of its own: its input gradient goes through a
//! generic transposed convolution and a depthwise weight gradient runs one small
//! convolution per channel; its BatchNorm, ReLU6 and max pooling are compositions of
//! generic operations. Written directly here: depthwise convolution as loops over one
//! plane at a time, dense and grouped convolution as im2col and GEMMs per image and group
//! (the `gemm` crate, which burn-flex itself uses), dense 3x3 stride-1 convolution by
//! Winograd F(4x4, 3x3), and
//! single-pass BatchNorm, ReLU6 and pooling. Work is split over images, planes and
//! channels with rayon; the hot loops are compiled for several instruction sets
//! (`multiversion`) because the crate's baseline target is plain SSE2.

use burn::backend::ops::ConvOptions;
use gemm::Parallelism;
use multiversion::multiversion;
use multiversion::target::{Target, selected_target};
use rayon::prelude::*;
use std::mem::MaybeUninit;

#[cfg(target_arch = "x86_64")]
mod pointwise;
mod winograd;

/// An elementwise function a forward convolution applies to each output plane (or image)
/// right after writing it, while it is still in cache: the activation after a convolution
/// with BatchNorm folded into it, at inference. `None` for none.
pub type OutputActivation = Option<fn(&mut [f32])>;

/// Shapes of one 2-D convolution that these kernels handle: dilation 1, and either dense
/// (`groups` independent convolutions over equal slices of the channels, as in ResNeXt and
/// RegNet; 1 for a plain one) or depthwise (one filter per channel).
#[derive(Debug, Clone, Copy)]
pub struct ConvGeometry {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub oh: usize,
    pub ow: usize,
    pub groups: usize,
    pub depthwise: bool,
}

impl ConvGeometry {
    /// `None` for a convolution these kernels do not cover (dilation, channels that do not
    /// split into the groups).
    pub fn new(x: [usize; 4], weight: [usize; 4], options: &ConvOptions<2>) -> Option<Self> {
        let [batch, cin, h, w] = x;
        let [cout, cin_per_group, kh, kw] = weight;
        let groups = options.groups;
        if options.dilation != [1, 1] || groups == 0 || cout % groups != 0 {
            return None;
        }
        if cin_per_group * groups != cin {
            return None;
        }
        let depthwise = groups > 1 && groups == cin && cout == cin;
        let [(pad_top, pad_bottom), (pad_left, pad_right)] = options.padding;
        let [sh, sw] = options.stride;
        let padded_h = h + pad_top + pad_bottom;
        let padded_w = w + pad_left + pad_right;
        if padded_h < kh || padded_w < kw || sh == 0 || sw == 0 {
            return None;
        }
        Some(Self {
            batch,
            cin,
            cout,
            h,
            w,
            kh,
            kw,
            sh,
            sw,
            pad_top,
            pad_left,
            oh: (padded_h - kh) / sh + 1,
            ow: (padded_w - kw) / sw + 1,
            groups,
            depthwise,
        })
    }

    /// The windows of a max pool: a depthwise geometry without weights.
    pub fn pool(
        x: [usize; 4],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [(usize, usize); 2],
    ) -> Option<Self> {
        let options = ConvOptions::new_with_padding(stride, padding, [1, 1], x[1]);
        Self::new(x, [x[1], 1, kernel[0], kernel[1]], &options)
    }

    pub fn output_shape(&self) -> [usize; 4] {
        [self.batch, self.cout, self.oh, self.ow]
    }

    fn in_plane(&self) -> usize {
        self.h * self.w
    }

    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }

    /// Rows of the im2col matrix: one per (input channel, kernel row, kernel column).
    fn patch_len(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// One group's rows of the im2col matrix (its input channels' rows are contiguous),
    /// and the columns of its weight matrix.
    fn group_patch_len(&self) -> usize {
        self.patch_len() / self.groups
    }

    fn cout_per_group(&self) -> usize {
        self.cout / self.groups
    }

    /// A 1x1 stride-1 unpadded convolution is a plain matrix product per image.
    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.sh == 1
            && self.sw == 1
            && self.pad_top == 0
            && self.pad_left == 0
            && self.oh == self.h
            && self.ow == self.w
    }

    /// 3x3 stride-1 dense convolutions go through Winograd's F(4x4, 3x3).
    fn is_winograd(&self) -> bool {
        self.groups == 1 && self.kh == 3 && self.kw == 3 && self.sh == 1 && self.sw == 1
    }

    /// The input gradient of a Winograd convolution is itself one: the output gradient
    /// convolved with the weights flipped in space and with input and output channels
    /// swapped, padded by `2 - padding` on each side. That geometry and those weights.
    fn winograd_input_grad(&self, weight: &[f32]) -> Option<(ConvGeometry, Vec<f32>)> {
        if !self.is_winograd() {
            return None;
        }
        // For a 3x3 stride-1 convolution oh = h + top + bottom - 2.
        let pad_bottom = (self.oh + 2).checked_sub(self.h + self.pad_top)?;
        let pad_right = (self.ow + 2).checked_sub(self.w + self.pad_left)?;
        let pads = [self.pad_top, pad_bottom, self.pad_left, pad_right];
        if pads.iter().any(|&p| p > 2) {
            return None;
        }
        let options = ConvOptions::new_with_padding(
            [1, 1],
            [
                (2 - self.pad_top, 2 - pad_bottom),
                (2 - self.pad_left, 2 - pad_right),
            ],
            [1, 1],
            1,
        );
        let grad_shape = [self.batch, self.cout, self.oh, self.ow];
        let transposed = ConvGeometry::new(grad_shape, [self.cin, self.cout, 3, 3], &options)?;
        let mut rotated = vec![0f32; weight.len()];
        for co in 0..self.cout {
            for ci in 0..self.cin {
                let src = &weight[(co * self.cin + ci) * 9..][..9];
                let dst = &mut rotated[(ci * self.cout + co) * 9..][..9];
                for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
                    *d = *s;
                }
            }
        }
        Some((transposed, rotated))
    }

    /// The kernel rows of output row `oy`'s window that fall inside the image, each with
    /// its input row.
    fn window_rows(&self, oy: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.kh).filter_map(move |ky| self.input_row(oy, ky).map(|iy| (ky, iy)))
    }

    /// The input row feeding output row `oy` through kernel row `ky`, if inside the image.
    fn input_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.sh + ky)
            .checked_sub(self.pad_top)
            .filter(|&iy| iy < self.h)
    }

    /// For kernel column `kx`: the output columns `lo..hi` whose input column
    /// `ox * sw + kx - pad_left` lies inside the image, and that input column for `lo`.
    fn column_span(&self, kx: usize) -> (usize, usize, usize) {
        let shift = self.pad_left as isize - kx as isize;
        let sw = self.sw as isize;
        // Smallest ox with ox * sw >= shift, largest with ox * sw - shift <= w - 1.
        let lo = if shift > 0 { (shift + sw - 1) / sw } else { 0 } as usize;
        let hi =
            ((self.w as isize - 1 + shift).div_euclid(sw) + 1).clamp(0, self.ow as isize) as usize;
        if lo >= hi {
            return (0, 0, 0);
        }
        (lo, hi, (lo as isize * sw - shift) as usize)
    }
}

/// The sum of `term(a[i], b[i])`, in sixteen independent accumulators so that the
/// compiler vectorises it (a single running sum would have to stay in order). Whole
/// 16-element chunks, not indices: with indices the loop did not vectorise as well
/// (a MobileNetV2 step measured 9% slower).
#[inline(always)]
fn sum16(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let b = &b[..a.len()];
    let (a_chunks, a_tail) = a.as_chunks::<16>();
    let (b_chunks, b_tail) = b.as_chunks::<16>();
    let mut acc = [0f32; 16];
    for (x, y) in a_chunks.iter().zip(b_chunks) {
        for i in 0..16 {
            acc[i] += term(x[i], y[i]);
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(&x, &y)| term(x, y)).sum();
    acc.iter().sum::<f32>() + tail
}

/// Depthwise forward, a plane at a time: blocks of output columns summed over all taps in
/// registers, each tap a contiguous load from a zero-padded copy of the plane whose
/// stride-2 rows are split into even and odd columns. burn-flex's kernel adds each tap to
/// the whole output row in turn (a load and a store per tap), which on the short rows of
/// the later layers runs mostly in its scalar remainder loop, and walks stride-2 rows
/// element by element.
pub fn depthwise_forward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: OutputActivation,
) -> Vec<f32> {
    let (kk, planes) = (g.kh * g.kw, g.cin);
    let taps = depthwise_taps(g);
    let padded_len = depthwise_padded_len(g);
    let mut y = uninit_output(g.batch * planes * g.out_plane());
    y.par_chunks_mut(g.out_plane())
        .zip(x.par_chunks(g.in_plane()))
        .enumerate()
        .for_each_init(
            || vec![0f32; padded_len],
            |padded, (p, (y, x))| {
                let c = p % planes;
                let b = bias.map_or(0.0, |b| b[c]);
                pad_plane(g, x, padded);
                let w = &weight[c * kk..][..kk];
                depthwise_plane_forward(g, &taps, w, b, padded, y);
                if let Some(activation) = activation {
                    // SAFETY: the plane's rows were all written just above.
                    activation(unsafe { y.assume_init_mut() });
                }
            },
        );
    // SAFETY: every plane was written above.
    unsafe { written(y) }
}

/// Where each tap `(ky, kx)` of output `(0, 0)` reads in a padded plane (see [`pad_plane`]).
fn depthwise_taps(g: &ConvGeometry) -> Vec<usize> {
    let phase = depthwise_phase_width(g);
    let row_len = g.sw * phase;
    (0..g.kh * g.kw)
        .map(|t| {
            let (ky, kx) = (t / g.kw, t % g.kw);
            ky * row_len + kx % g.sw * phase + kx / g.sw
        })
        .collect()
}

/// The floats of one padded plane.
fn depthwise_padded_len(g: &ConvGeometry) -> usize {
    depthwise_padded_rows(g) * g.sw * depthwise_phase_width(g)
}

/// Output columns one depthwise accumulator covers: an AVX2 register.
const LANES: usize = 8;

/// The width of one column phase of a padded row: the output columns (in whole
/// accumulators) plus the taps to the right of the last.
fn depthwise_phase_width(g: &ConvGeometry) -> usize {
    g.ow.div_ceil(LANES) * LANES + (g.kw - 1) / g.sw
}

/// The rows of a padded plane that the output rows read.
fn depthwise_padded_rows(g: &ConvGeometry) -> usize {
    (g.oh - 1) * g.sh + g.kh
}

/// Copies the plane into `padded`, `[padded rows][sw phases][phase width]`: padded column
/// `j` goes to phase `j % sw` at `j / sw`. Only the image is written, so the zeros around
/// it stay from the buffer's allocation for every plane of one convolution.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn pad_plane(g: &ConvGeometry, x: &[f32], padded: &mut [f32]) {
    let phase = depthwise_phase_width(g);
    for (iy, start) in padded_row_starts(g) {
        let (src, dst) = (&x[iy * g.w..][..g.w], &mut padded[start..][..g.sw * phase]);
        match g.sw {
            1 => {
                let n = g.w.min(phase - g.pad_left);
                copy_row(&src[..n], &mut dst[g.pad_left..g.pad_left + n]);
            }
            2 => deinterleave_row(src, g.pad_left, dst.split_at_mut(phase)),
            _ => {
                for (first, span) in phase_spans(g) {
                    if let Some(src) = src.get(first..) {
                        for (d, s) in dst[span].iter_mut().zip(src.iter().step_by(g.sw)) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }
}

/// `src` into `dst`, of equal lengths, in blocks of 16 floats (vector moves): rows are 7
/// to 112 floats, short enough that the call to `memmove` that `copy_from_slice` makes was
/// a third of the copy's cost (4% of MobileNetV2's inference).
#[inline(always)]
fn copy_row(src: &[f32], dst: &mut [f32]) {
    let (blocks, rest) = src.as_chunks::<16>();
    let (to_blocks, to_rest) = dst.as_chunks_mut::<16>();
    for (to, block) in to_blocks.iter_mut().zip(blocks) {
        *to = *block;
    }
    for (to, &v) in to_rest.iter_mut().zip(rest) {
        *to = v;
    }
}

/// The image rows that some output reads, each with the start of its row in the padded
/// plane.
fn padded_row_starts(g: &ConvGeometry) -> impl Iterator<Item = (usize, usize)> + '_ {
    let row_len = g.sw * depthwise_phase_width(g);
    let rows = depthwise_padded_rows(g).saturating_sub(g.pad_top);
    (0..g.h.min(rows)).map(move |iy| (iy, (iy + g.pad_top) * row_len))
}

/// For each column phase of a padded row: the first image column that falls in it, and
/// the part of the row that image columns from there on (every `sw`-th) fill.
fn phase_spans(g: &ConvGeometry) -> impl Iterator<Item = (usize, std::ops::Range<usize>)> + '_ {
    let phase = depthwise_phase_width(g);
    (0..g.sw).map(move |p| {
        let first = (p + g.sw - g.pad_left % g.sw) % g.sw;
        (
            first,
            p * phase + (first + g.pad_left) / g.sw..(p + 1) * phase,
        )
    })
}

/// One image row into the even and odd phases of a stride-2 padded row, `pad` zeros to
/// its left: image column `i` is padded column `i + pad`. Pairs of columns at a time, so
/// that it vectorises as shuffles (the general loop above gathers one float at a time,
/// which made the copy a tenth of MobileNetV2's inference).
#[inline(always)]
fn deinterleave_row(src: &[f32], pad: usize, (even, odd): (&mut [f32], &mut [f32])) {
    // The image column that falls on the first even padded column.
    let first = pad % 2;
    if let (1, Some(o), Some(&s)) = (first, odd.get_mut(pad / 2), src.first()) {
        *o = s;
    }
    let start = (first + pad) / 2;
    let (Some(even), Some(odd), Some(src)) = (
        even.get_mut(start..),
        odd.get_mut(start..),
        src.get(first..),
    ) else {
        return;
    };
    let pairs = src.chunks_exact(2);
    let rest = pairs.remainder();
    let mut written = 0;
    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(pairs) {
        (*e, *o) = (pair[0], pair[1]);
        written += 1;
    }
    if let (Some(e), [last]) = (even.get_mut(written), rest) {
        *e = *last;
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn depthwise_plane_forward(
    g: &ConvGeometry,
    taps: &[usize],
    w: &[f32],
    bias: f32,
    padded: &[f32],
    y: &mut [MaybeUninit<f32>],
) {
    let rows = y.chunks_exact_mut(g.ow * TILE_ROWS);
    let tail = rows.len() * TILE_ROWS;
    for (band, out) in rows.enumerate() {
        depthwise_rows::<TILE_ROWS>(g, taps, w, bias, padded, band * TILE_ROWS, out);
    }
    let out = &mut y[tail * g.ow..];
    match g.oh - tail {
        0 => {}
        1 => depthwise_rows::<1>(g, taps, w, bias, padded, tail, out),
        2 => depthwise_rows::<2>(g, taps, w, bias, padded, tail, out),
        _ => depthwise_rows::<3>(g, taps, w, bias, padded, tail, out),
    }
}

/// Output rows one depthwise tile covers, an accumulator each: independent chains of
/// multiply-adds that overlap, however short the rows (the late layers' are 7 to 28).
const TILE_ROWS: usize = 4;

/// `R` output rows from `oy`, a block of [`LANES`] columns at a time, all taps summed in
/// registers.
#[inline(always)]
fn depthwise_rows<const R: usize>(
    g: &ConvGeometry,
    taps: &[usize],
    w: &[f32],
    bias: f32,
    padded: &[f32],
    oy: usize,
    out: &mut [MaybeUninit<f32>],
) {
    let row_len = g.sw * depthwise_phase_width(g);
    let step = g.sh * row_len;
    let rows = &padded[oy * step..];
    let last_block = (g.ow - 1) / LANES * LANES;
    let last_tap = taps.iter().max().copied().unwrap_or(0);
    assert!((R - 1) * step + last_tap + last_block + LANES <= rows.len() && w.len() >= taps.len());
    for start in (0..g.ow).step_by(LANES) {
        let mut acc = [[bias; LANES]; R];
        for (t, &tap) in taps.iter().enumerate() {
            // SAFETY: the assert above bounds every index of the loop.
            let wv = unsafe { *w.get_unchecked(t) };
            for (r, a) in acc.iter_mut().enumerate() {
                let at = r * step + tap + start;
                for (l, a) in a.iter_mut().enumerate() {
                    // SAFETY: as above.
                    *a = wv.mul_add(unsafe { *rows.get_unchecked(at + l) }, *a);
                }
            }
        }
        let n = LANES.min(g.ow - start);
        for (r, a) in acc.iter().enumerate() {
            store_block::<LANES>(&mut out[r * g.ow + start..], &a[..n]);
        }
    }
}

/// Writes up to `N` accumulated values. A whole block is a copy of constant length,
/// which compiles to vector stores; a copy of variable length called `memmove` per block
/// (4% of MobileNetV2's inference, most of it the store to memory, which stays).
#[inline(always)]
fn store_block<const N: usize>(out: &mut [MaybeUninit<f32>], values: &[f32]) {
    if let (Some(out), Ok(values)) = (out.first_chunk_mut::<N>(), <&[f32; N]>::try_from(values)) {
        out.write_copy_of_slice(values);
    } else {
        for (o, &v) in out.iter_mut().zip(values) {
            o.write(v);
        }
    }
}

/// Depthwise input gradient: per plane, each tap's contribution added to a padded plane's
/// gradient (laid out as [`pad_plane`]'s, so every tap is a contiguous run, stride 2
/// included), which is then cropped back to the image.
pub fn depthwise_backward_input(g: &ConvGeometry, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    let (kk, planes) = (g.kh * g.kw, g.cin);
    let taps = depthwise_taps(g);
    let padded_len = depthwise_padded_len(g);
    let mut dx = uninit_output(g.batch * planes * g.in_plane());
    dx.par_chunks_mut(g.in_plane())
        .zip(grad.par_chunks(g.out_plane()))
        .enumerate()
        .for_each_init(
            || (vec![0f32; padded_len], Vec::new()),
            |(padded, dy_rows), (p, (dx, dy))| {
                let w = &weight[(p % planes) * kk..][..kk];
                pad_rows(g, dy, dy_rows);
                padded.fill(0.0);
                depthwise_plane_input_grad(g, &taps, w, dy_rows, padded);
                crop_plane(g, padded, zero(dx));
            },
        );
    // SAFETY: every plane was zeroed, then cropped into.
    unsafe { written(dx) }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn depthwise_plane_input_grad(
    g: &ConvGeometry,
    taps: &[usize],
    w: &[f32],
    dy_rows: &[f32],
    padded: &mut [f32],
) {
    let step = g.sh * g.sw * depthwise_phase_width(g);
    let width = g.ow.next_multiple_of(LANES);
    for (&tap, &wv) in taps.iter().zip(w) {
        for (oy, dy) in dy_rows.chunks_exact(width).enumerate() {
            let dst = &mut padded[oy * step + tap..][..width];
            for (d, dy) in dst.iter_mut().zip(dy) {
                *d = wv.mul_add(*dy, *d);
            }
        }
    }
}

/// The image part of a padded plane's gradient (the inverse of [`pad_plane`]) into `dx`,
/// zeroed: image rows and columns that no output reads keep their zero.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn crop_plane(g: &ConvGeometry, padded: &[f32], dx: &mut [f32]) {
    let phase = depthwise_phase_width(g);
    for (iy, start) in padded_row_starts(g) {
        let (src, dst) = (&padded[start..][..g.sw * phase], &mut dx[iy * g.w..][..g.w]);
        match g.sw {
            1 => {
                let n = g.w.min(phase - g.pad_left);
                dst[..n].copy_from_slice(&src[g.pad_left..g.pad_left + n]);
            }
            2 => interleave_row(src.split_at(phase), g.pad_left, dst),
            _ => {
                for (first, span) in phase_spans(g) {
                    if let Some(dst) = dst.get_mut(first..) {
                        for (d, s) in dst.iter_mut().step_by(g.sw).zip(&src[span]) {
                            *d = *s;
                        }
                    }
                }
            }
        }
    }
}

/// The inverse of [`deinterleave_row`]: the even and odd phases of a stride-2 padded row
/// back into the image row `dst`.
#[inline(always)]
fn interleave_row((even, odd): (&[f32], &[f32]), pad: usize, dst: &mut [f32]) {
    let first = pad % 2;
    if let (1, Some(&o), Some(d)) = (first, odd.get(pad / 2), dst.first_mut()) {
        *d = o;
    }
    let start = (first + pad) / 2;
    let (Some(even), Some(odd), Some(dst)) =
        (even.get(start..), odd.get(start..), dst.get_mut(first..))
    else {
        return;
    };
    let mut pairs = dst.chunks_exact_mut(2);
    let mut read = 0;
    for ((e, o), pair) in even.iter().zip(odd).zip(pairs.by_ref()) {
        (pair[0], pair[1]) = (*e, *o);
        read += 1;
    }
    if let ([last], Some(e)) = (pairs.into_remainder(), even.get(read)) {
        *last = *e;
    }
}

/// Depthwise weight gradient: per plane partial sums, then a sum over the batch in image
/// order. Each tap's sum runs over the padded plane of the forward (every tap a contiguous
/// load, stride 2 included) and the output gradient with its rows padded to whole
/// registers, in one register: a dot product per row and tap, as before, spent most of
/// its time in horizontal sums and stride-2 gathers.
pub fn depthwise_backward_weight(g: &ConvGeometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (kk, planes) = (g.kh * g.kw, g.cin);
    let taps = depthwise_taps(g);
    let padded_len = depthwise_padded_len(g);
    let mut partial = vec![0f32; g.batch * planes * kk];
    partial
        .par_chunks_mut(kk)
        .zip(x.par_chunks(g.in_plane()))
        .zip(grad.par_chunks(g.out_plane()))
        .for_each_init(
            || (vec![0f32; padded_len], Vec::new()),
            |(padded, dy_rows), ((dw, x), dy)| {
                pad_plane(g, x, padded);
                pad_rows(g, dy, dy_rows);
                depthwise_plane_weight_grad(g, &taps, padded, dy_rows, dw);
            },
        );
    let mut dw = vec![0f32; planes * kk];
    for image in partial.chunks_exact(planes * kk) {
        for (d, p) in dw.iter_mut().zip(image) {
            *d += p;
        }
    }
    dw
}

/// The output rows padded with zeros to whole accumulators of [`LANES`].
fn pad_rows(g: &ConvGeometry, dy: &[f32], rows: &mut Vec<f32>) {
    let width = g.ow.next_multiple_of(LANES);
    rows.clear();
    for row in dy.chunks_exact(g.ow) {
        rows.extend_from_slice(row);
        rows.resize(rows.len() + width - g.ow, 0.0);
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn depthwise_plane_weight_grad(
    g: &ConvGeometry,
    taps: &[usize],
    padded: &[f32],
    dy_rows: &[f32],
    dw: &mut [f32],
) {
    let (dw_groups, dw_rest) = dw.as_chunks_mut::<TAP_GROUP>();
    let (tap_groups, tap_rest) = taps.as_chunks::<TAP_GROUP>();
    for (d, t) in dw_groups.iter_mut().zip(tap_groups) {
        weight_grad_taps(g, t, padded, dy_rows, d);
    }
    for (d, t) in dw_rest.iter_mut().zip(tap_rest) {
        weight_grad_taps(g, &[*t], padded, dy_rows, std::array::from_mut(d));
    }
}

/// Taps whose weight gradients are summed together: four independent chains of
/// multiply-adds, each output-gradient block loaded once for all four. One tap at a time,
/// each chain waited on its own previous sum (the late layers' planes are 7 to 14 wide:
/// one or two blocks per row).
const TAP_GROUP: usize = 4;

/// The weight gradients of `T` taps: each the sum over the plane of the output gradient
/// times the input under that tap, in the same order for every tap.
#[inline(always)]
fn weight_grad_taps<const T: usize>(
    g: &ConvGeometry,
    taps: &[usize; T],
    padded: &[f32],
    dy_rows: &[f32],
    dw: &mut [f32; T],
) {
    let step = g.sh * g.sw * depthwise_phase_width(g);
    let width = g.ow.next_multiple_of(LANES);
    let mut acc = [[0f32; LANES]; T];
    for (oy, dy) in dy_rows.chunks_exact(width).enumerate() {
        let row = &padded[oy * step..];
        for (c, dy) in dy.as_chunks::<LANES>().0.iter().enumerate() {
            for (a, &tap) in acc.iter_mut().zip(taps) {
                let src = row[tap + c * LANES..]
                    .first_chunk::<LANES>()
                    .expect("padded");
                for ((a, dy), s) in a.iter_mut().zip(dy).zip(src) {
                    *a = dy.mul_add(*s, *a);
                }
            }
        }
    }
    for (d, a) in dw.iter_mut().zip(acc) {
        *d = a.iter().sum();
    }
}

/// A row-major or transposed view of a matrix for [`matmul`].
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    row_stride: isize,
    col_stride: isize,
}

impl<'a> MatRef<'a> {
    pub(crate) fn rows(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: cols as isize,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    pub(crate) fn transposed(data: &'a [f32], cols: usize) -> Self {
        Self {
            data,
            row_stride: 1,
            col_stride: cols as isize,
        }
    }
}

/// `out[m, n] (+)= a[m, k] * b[k, n]`, `out` row-major. Single-threaded: callers split
/// their work over images.
pub(crate) fn matmul(
    out: &mut [f32],
    a: MatRef,
    b: MatRef,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
) {
    matmul_with(out, n, a, b, (m, n, k), accumulate, Parallelism::None);
}

/// [`matmul`] with `out`'s rows `out_row_stride` apart and a choice of threading.
fn matmul_with(
    out: &mut [f32],
    out_row_stride: usize,
    a: MatRef,
    b: MatRef,
    dims: (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    // SAFETY: `out` is initialised, so gemm may read it when accumulating.
    unsafe {
        gemm_into(
            out.as_mut_ptr(),
            out.len(),
            out_row_stride,
            a,
            b,
            dims,
            accumulate,
            parallelism,
        );
    }
}

/// `out = a * b` into memory nothing has written yet (see [`uninit_output`]), rows
/// `out_row_stride` apart: gemm only writes `out` when it does not accumulate.
fn matmul_uninit(
    out: &mut [MaybeUninit<f32>],
    out_row_stride: usize,
    a: MatRef,
    b: MatRef,
    dims: (usize, usize, usize),
    parallelism: Parallelism,
) {
    let len = out.len();
    // SAFETY: without `accumulate` gemm never reads `out`.
    unsafe {
        gemm_into(
            out.as_mut_ptr().cast(),
            len,
            out_row_stride,
            a,
            b,
            dims,
            false,
            parallelism,
        );
    }
}

/// The one call into gemm: `out[m, n] (+)= a[m, k] * b[k, n]`, `out`'s rows
/// `out_row_stride` apart. The bounds are checked here.
///
/// # Safety
/// `out` is valid for writes of `out_len` floats, and holds initialised values when
/// `accumulate`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    out: *mut f32,
    out_len: usize,
    out_row_stride: usize,
    a: MatRef,
    b: MatRef,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert!(n <= out_row_stride && (m.max(1) - 1) * out_row_stride + n <= out_len);
    let last = |r: MatRef, rows: usize, cols: usize| {
        (rows.max(1) - 1) as isize * r.row_stride + (cols.max(1) - 1) as isize * r.col_stride
    };
    assert!((last(a, m, k) as usize) < a.data.len().max(1));
    assert!((last(b, k, n) as usize) < b.data.len().max(1));
    // SAFETY: the asserts above keep every element gemm touches inside the three buffers;
    // the caller vouches for `out`, which cannot alias the borrowed inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out,
            1,
            out_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride,
            a.row_stride,
            b.data.as_ptr(),
            b.col_stride,
            b.row_stride,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A buffer for a kernel that writes every element before anything reads it. Zeroing it
/// first, as `vec![0.0; len]` does, cost a tenth of MobileNetV2's inference in `memset`.
fn uninit_output(len: usize) -> Box<[MaybeUninit<f32>]> {
    Box::new_uninit_slice(len)
}

/// The buffer of [`uninit_output`] once the kernel has written all of it.
///
/// # Safety
/// Every element of `buffer` has been written.
unsafe fn written(buffer: Box<[MaybeUninit<f32>]>) -> Vec<f32> {
    // SAFETY: the caller vouches that all of it is initialised.
    unsafe { buffer.assume_init() }.into_vec()
}

/// Unfold one image `[cin, h, w]` into `[cin * kh * kw, oh * ow]`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn im2col(g: &ConvGeometry, x: &[f32], cols: &mut [MaybeUninit<f32>]) {
    let p = g.out_plane();
    for c in 0..g.cin {
        let plane = &x[c * g.in_plane()..][..g.in_plane()];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &mut cols[((c * g.kh + ky) * g.kw + kx) * p..][..p];
                let (lo, hi, ix) = g.column_span(kx);
                for oy in 0..g.oh {
                    let out = &mut row[oy * g.ow..][..g.ow];
                    let Some(iy) = g.input_row(oy, ky) else {
                        zero(out);
                        continue;
                    };
                    let src = &plane[iy * g.w..][..g.w];
                    zero(&mut out[..lo]);
                    zero(&mut out[hi..]);
                    for (o, s) in out[lo..hi].iter_mut().zip(src[ix..].iter().step_by(g.sw)) {
                        o.write(*s);
                    }
                }
            }
        }
    }
}

/// Fold `[cin * kh * kw, oh * ow]` back onto one zeroed image `[cin, h, w]`, summing
/// overlaps.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn col2im(g: &ConvGeometry, cols: &[f32], x: &mut [f32]) {
    let p = g.out_plane();
    for c in 0..g.cin {
        let plane = &mut x[c * g.in_plane()..][..g.in_plane()];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &cols[((c * g.kh + ky) * g.kw + kx) * p..][..p];
                let (lo, hi, ix) = g.column_span(kx);
                for oy in 0..g.oh {
                    let Some(iy) = g.input_row(oy, ky) else {
                        continue;
                    };
                    let dst = &mut plane[iy * g.w..][..g.w];
                    for (d, s) in dst[ix..]
                        .iter_mut()
                        .step_by(g.sw)
                        .zip(&row[oy * g.ow + lo..oy * g.ow + hi])
                    {
                        *d += s;
                    }
                }
            }
        }
    }
}

/// The im2col matrix `[cin * kh * kw, oh * ow]` of one image, unfolded into `cols`; for a
/// pointwise convolution the image itself.
fn patches<'a>(g: &ConvGeometry, x: &'a [f32], cols: &'a mut Vec<f32>) -> &'a [f32] {
    if g.is_pointwise() {
        return x;
    }
    let len = g.patch_len() * g.out_plane();
    cols.clear();
    cols.reserve(len);
    im2col(g, x, &mut cols.spare_capacity_mut()[..len]);
    // SAFETY: im2col wrote every element of the matrix.
    unsafe { cols.set_len(len) };
    cols
}

/// Zeros written over `buffer`, which may not have been written before.
fn zero(buffer: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    for v in buffer.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was written just above.
    unsafe { buffer.assume_init_mut() }
}

/// Dense forward: per image and group, `W_g [cout / groups, K_g] * cols_g [K_g, P]`,
/// written straight into NCHW. Images are split over threads; a batch smaller than the
/// thread pool splits each product instead. The output is made a block of columns at a
/// time, and the bias and activation are applied to each block while it is in cache.
pub fn dense_forward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: OutputActivation,
) -> Vec<f32> {
    if g.is_winograd() {
        return winograd::forward(g, x, weight, bias, activation);
    }
    #[cfg(target_arch = "x86_64")]
    if pointwise::covers(g) {
        return pointwise::forward(g, x, weight, bias, activation);
    }
    let (k, p) = (g.group_patch_len(), g.out_plane());
    let cout = g.cout_per_group();
    let threads = rayon::current_num_threads();
    let parallelism = if g.batch < threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // At least 16 columns, so that neither an empty plane nor a very wide layer makes it 0.
    let block = if bias.is_none() && activation.is_none() {
        p
    } else {
        (EPILOGUE_BLOCK / g.cout).next_multiple_of(16)
    }
    .max(16);
    let mut y = uninit_output(g.batch * g.cout * p);
    y.par_chunks_mut(g.cout * p)
        .zip(x.par_chunks(g.cin * g.in_plane()))
        .with_max_len(1)
        .for_each_init(Vec::new, |cols, (y, x)| {
            let patches = patches(g, x, cols);
            for start in (0..p).step_by(block) {
                let n = block.min(p - start);
                for (group, w) in weight.chunks_exact(cout * k).enumerate() {
                    let out = &mut y[group * cout * p + start..];
                    let patches = MatRef::rows(&patches[group * k * p + start..], p);
                    matmul_uninit(
                        out,
                        p,
                        MatRef::rows(w, k),
                        patches,
                        (cout, n, k),
                        parallelism,
                    );
                }
                for (c, row) in y.chunks_exact_mut(p).enumerate() {
                    // SAFETY: the groups' products wrote these columns of every channel.
                    let out = unsafe { row[start..start + n].assume_init_mut() };
                    if let Some(bias) = bias {
                        affine(out, 1.0, bias[c]);
                    }
                    if let Some(activation) = activation {
                        activation(out);
                    }
                }
            }
        });
    // SAFETY: every column of every image was written above.
    unsafe { written(y) }
}

/// Output floats (all channels of a block of columns) that one product writes before the
/// bias and activation go over them: 128 KiB, well inside the L2 cache of every x86 and
/// Arm core this runs on (256 KiB and up), so that pass reads from cache, not memory.
const EPILOGUE_BLOCK: usize = 32 * 1024;

/// Dense input gradient: per image and group, `W_g^T [K_g, cout / groups] * dY_g`, folded
/// back with col2im.
pub fn dense_backward_input(g: &ConvGeometry, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    if let Some((transposed, rotated)) = g.winograd_input_grad(weight) {
        return winograd::forward(&transposed, grad, &rotated, None, None);
    }
    let (k, p) = (g.group_patch_len(), g.out_plane());
    let cout = g.cout_per_group();
    let mut dx = uninit_output(g.batch * g.cin * g.in_plane());
    dx.par_chunks_mut(g.cin * g.in_plane())
        .zip(grad.par_chunks(g.cout * p))
        .for_each_init(Vec::new, |cols, (dx, dy)| {
            let patches = if g.is_pointwise() {
                &mut dx[..]
            } else {
                cols.clear();
                cols.reserve(g.patch_len() * p);
                &mut cols.spare_capacity_mut()[..g.patch_len() * p]
            };
            let groups = patches
                .chunks_exact_mut(k * p)
                .zip(weight.chunks_exact(cout * k))
                .zip(dy.chunks_exact(cout * p));
            for ((patches, w), dy) in groups {
                let (w_t, dy) = (MatRef::transposed(w, k), MatRef::rows(dy, p));
                matmul_uninit(patches, p, w_t, dy, (k, p, cout), Parallelism::None);
            }
            if !g.is_pointwise() {
                // SAFETY: the groups' products wrote the whole matrix.
                unsafe { cols.set_len(g.patch_len() * p) };
                col2im(g, cols, zero(dx));
            }
        });
    // SAFETY: every image was written, by its product or by col2im.
    unsafe { written(dx) }
}

/// Partial weight gradients per dense convolution. The batch is cut into this many runs of
/// images whatever the thread count, each run is summed in image order and the runs are
/// added in index order, so the gradient is the same bit for bit on any number of threads
/// (a rayon fold/reduce combines partial sums in an order set by work stealing).
const WEIGHT_GRAD_PARTIALS: usize = 4;

/// Dense weight gradient: `sum over images of dY_g [cout / groups, P] * cols_g^T [P, K_g]`
/// for each group.
pub fn dense_backward_weight(g: &ConvGeometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (k, p) = (g.group_patch_len(), g.out_plane());
    let cout = g.cout_per_group();
    let len = g.cout * k;
    let runs = g.batch.clamp(1, WEIGHT_GRAD_PARTIALS);
    // Threads left over by the runs go to each run's GEMM, which splits only its output.
    let threads = rayon::current_num_threads();
    let inner = match threads / runs {
        0 | 1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    };
    let (image_len, grad_len) = (g.cin * g.in_plane(), g.cout * p);
    let mut partials = vec![0f32; runs * len];
    partials
        .par_chunks_mut(len)
        .enumerate()
        .for_each_init(Vec::new, |cols, (run, dw)| {
            for n in run * g.batch / runs..(run + 1) * g.batch / runs {
                let x = &x[n * image_len..][..image_len];
                let dy = &grad[n * grad_len..][..grad_len];
                let patches = patches(g, x, cols);
                let groups = dw
                    .chunks_exact_mut(cout * k)
                    .zip(dy.chunks_exact(cout * p))
                    .zip(patches.chunks_exact(k * p));
                for ((dw, dy), patches) in groups {
                    let (dy, patches) = (MatRef::rows(dy, p), MatRef::transposed(patches, p));
                    matmul_with(dw, k, dy, patches, (cout, k, p), true, inner);
                }
            }
        });
    let (dw, rest) = partials.split_at_mut(len);
    dw.par_chunks_mut(1 << 14).enumerate().for_each(|(i, out)| {
        for part in rest.chunks_exact(len) {
            for (d, v) in out.iter_mut().zip(&part[i << 14..]) {
                *d += v;
            }
        }
    });
    // The gradient lives until the optimizer step: give back the other runs' room.
    partials.truncate(len);
    partials.shrink_to_fit();
    partials
}

/// `min(max(x, 0), 6)`, NaN kept as NaN (as PyTorch).
pub fn relu6_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(relu6_chunk);
}

/// `max(x, 0)` on one thread, NaN kept (as PyTorch's).
pub fn relu_chunk(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX.
        return unsafe { relu_avx(x) };
    }
    // Not `f32::max`, which would turn NaN into 0.
    x.iter_mut()
        .for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
}

/// [`relu_chunk`] with AVX's `max(0, x)`, which returns `x` when it is NaN. Intrinsics: the
/// compiler turned the select above into a store of zero only where `x < 0`, a masked
/// store (`vmaskmovps`) that AMD cores run microcoded; ReLU took 8% of MobileNetV3's
/// inference there.
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn relu_avx(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let (blocks, rest) = x.as_chunks_mut::<8>();
    for block in blocks {
        // SAFETY: a block is 8 floats.
        unsafe {
            let v = _mm256_loadu_ps(block.as_ptr());
            _mm256_storeu_ps(block.as_mut_ptr(), _mm256_max_ps(_mm256_setzero_ps(), v));
        }
    }
    rest.iter_mut()
        .for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
}

/// [`relu6_in_place`] on one thread.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn relu6_chunk(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
}

/// The gradient passes where the output is strictly inside (0, 6), as PyTorch's hardtanh;
/// written over `grad` in place.
pub fn relu6_backward_in_place(output: &[f32], grad: &mut [f32]) {
    grad.par_chunks_mut(1 << 14)
        .zip(output.par_chunks(1 << 14))
        .for_each(|(d, y)| relu6_mask(y, d));
}

fn relu6_mask(output: &[f32], grad: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX.
        return unsafe { relu6_mask_avx(output, grad) };
    }
    for (d, &y) in grad.iter_mut().zip(output) {
        *d = if y > 0.0 && y < 6.0 { *d } else { 0.0 };
    }
}

/// [`relu6_mask`] as a bitwise and with the comparisons' mask, for the reason of
/// [`relu_avx`].
///
/// # Safety
/// The CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn relu6_mask_avx(output: &[f32], grad: &mut [f32]) {
    use std::arch::x86_64::*;
    let output = &output[..grad.len()];
    let (blocks, rest) = grad.as_chunks_mut::<8>();
    let (outputs, output_rest) = output.as_chunks::<8>();
    for (d, y) in blocks.iter_mut().zip(outputs) {
        // SAFETY: blocks are 8 floats.
        unsafe {
            let y = _mm256_loadu_ps(y.as_ptr());
            let inside = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(y, _mm256_setzero_ps()),
                _mm256_cmp_ps::<_CMP_LT_OQ>(y, _mm256_set1_ps(6.0)),
            );
            let kept = _mm256_and_ps(_mm256_loadu_ps(d.as_ptr()), inside);
            _mm256_storeu_ps(d.as_mut_ptr(), kept);
        }
    }
    for (d, &y) in rest.iter_mut().zip(output_rest) {
        *d = if y > 0.0 && y < 6.0 { *d } else { 0.0 };
    }
}

/// `x * sigmoid(x)` in place.
pub fn silu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(silu_chunk);
}

/// The SiLU gradient `s * (1 + x * (1 - s))`, `s = sigmoid(x)`, multiplied into `grad`.
pub fn silu_backward_in_place(input: &[f32], grad: &mut [f32]) {
    grad.par_chunks_mut(1 << 14)
        .zip(input.par_chunks(1 << 14))
        .for_each(|(d, x)| silu_grad_chunk(x, d));
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn silu_chunk(x: &mut [f32]) {
    const RECIPROCAL: Reciprocal = Reciprocal::for_target(selected_target!());
    let mut blocks = x.chunks_exact_mut(RECIPROCAL_LANES);
    for block in &mut blocks {
        silu_block(RECIPROCAL, block.try_into().expect("exact chunks"));
    }
    let rest = blocks.into_remainder();
    if !rest.is_empty() {
        let mut padded = padded_block(rest);
        silu_block(RECIPROCAL, &mut padded);
        rest.copy_from_slice(&padded[..rest.len()]);
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn silu_grad_chunk(input: &[f32], grad: &mut [f32]) {
    const RECIPROCAL: Reciprocal = Reciprocal::for_target(selected_target!());
    let mut inputs = input.chunks_exact(RECIPROCAL_LANES);
    let mut grads = grad.chunks_exact_mut(RECIPROCAL_LANES);
    for (x, d) in (&mut inputs).zip(&mut grads) {
        let (x, d) = (
            x.try_into().expect("exact chunks"),
            d.try_into().expect("exact chunks"),
        );
        silu_grad_block(RECIPROCAL, x, d);
    }
    let rest = grads.into_remainder();
    if !rest.is_empty() {
        let mut padded = padded_block(rest);
        silu_grad_block(RECIPROCAL, &padded_block(inputs.remainder()), &mut padded);
        rest.copy_from_slice(&padded[..rest.len()]);
    }
}

/// Values SiLU takes at once: one 512-bit register, or two 256-bit ones. The slice's tail
/// goes through the same code padded to a whole block, so that every value takes the same
/// vector path whatever the slice's length: results do not depend on how a tensor was
/// split over threads. (Blocks are plain loops in the `multiversion` functions themselves,
/// not closures: a closure is compiled without the build's target features.)
const RECIPROCAL_LANES: usize = 16;

/// `rest` (shorter than a block) padded with ones.
#[inline(always)]
fn padded_block(rest: &[f32]) -> [f32; RECIPROCAL_LANES] {
    let mut padded = [1.0; RECIPROCAL_LANES];
    padded[..rest.len()].copy_from_slice(rest);
    padded
}

/// `x * sigmoid(x)` on one block.
#[inline(always)]
fn silu_block(reciprocal: Reciprocal, block: &mut [f32; RECIPROCAL_LANES]) {
    let mut sigmoid = [0.0; RECIPROCAL_LANES];
    for (s, &v) in sigmoid.iter_mut().zip(&*block) {
        *s = 1.0 + exp_approx(-v);
    }
    // SAFETY: `reciprocal` was made for the target of the build this is inlined into.
    unsafe { reciprocal.apply(&mut sigmoid) };
    for (v, s) in block.iter_mut().zip(sigmoid) {
        *v *= s;
    }
}

/// The SiLU gradient on one block.
#[inline(always)]
fn silu_grad_block(
    reciprocal: Reciprocal,
    x: &[f32; RECIPROCAL_LANES],
    grad: &mut [f32; RECIPROCAL_LANES],
) {
    let mut s = [0.0; RECIPROCAL_LANES];
    for (s, &v) in s.iter_mut().zip(x) {
        *s = 1.0 + exp_approx(-v);
    }
    // SAFETY: as in `silu_block`.
    unsafe { reciprocal.apply(&mut s) };
    for ((d, &x), s) in grad.iter_mut().zip(x).zip(s) {
        *d *= s * (1.0 + x * (1.0 - s));
    }
}

/// How one `multiversion` build computes the sigmoid's `1 / d`, `d = 1 + exp(-x)`: with
/// AVX-512, the hardware's 14-bit reciprocal estimate refined by one Newton step
/// `r + r (1 - d r)`, to within about an ulp of the quotient; elsewhere a division. The
/// 512-bit division was the slow part of SiLU on the Intel Xeon here (`vdivps` on 16 lanes
/// takes several times an FMA's throughput), and the compiler never turns a division into
/// the estimate on its own, hence `std::arch`. With AVX2 the division stays: on the AMD
/// EPYC the 256-bit divider runs beside the FMA pipes that the exponential's polynomial
/// keeps busy, and AVX's 12-bit estimate, which needs two steps (after one, its 1.3e-7
/// error times `x` in SiLU's gradient fails the 1e-6 check against burn's), measured 0.96x.
/// `d` lies in `[1, exp(88)]`, where the estimate is defined (above 2^126 it gives 0, and
/// `x * 0` is SiLU's value to within 1e-36).
#[derive(Clone, Copy)]
enum Reciprocal {
    Avx512,
    Divide,
}

impl Reciprocal {
    /// The estimate a build for `target` can use; evaluated at compile time.
    const fn for_target(target: Target) -> Self {
        // `cfg!` first: the x86 feature names are unknown to (and panic on) other targets.
        let x86 = cfg!(target_arch = "x86_64");
        if x86 && target.supports_feature_str("avx512f") {
            Reciprocal::Avx512
        } else {
            Reciprocal::Divide
        }
    }

    /// `d` replaced by its reciprocals.
    ///
    /// # Safety
    /// The CPU has the features of the target that `self` was made for.
    #[inline(always)]
    unsafe fn apply(self, d: &mut [f32; RECIPROCAL_LANES]) {
        match self {
            // SAFETY: the caller's guarantee.
            #[cfg(target_arch = "x86_64")]
            Reciprocal::Avx512 => unsafe { reciprocals_avx512(d) },
            _ => {
                for v in d {
                    *v = 1.0 / *v;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn reciprocals_avx512(d: &mut [f32; RECIPROCAL_LANES]) {
    use std::arch::x86_64::*;
    // SAFETY: `d` holds the 16 floats an unaligned 512-bit load and store touch.
    let v = unsafe { _mm512_loadu_ps(d.as_ptr()) };
    let one = _mm512_set1_ps(1.0);
    let r = _mm512_rcp14_ps(v);
    let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(v, r, one), r);
    unsafe { _mm512_storeu_ps(d.as_mut_ptr(), r) };
}

/// `x * relu6(x + 3) / 6` in place.
pub fn hardswish_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(hardswish_chunk);
}

/// The hardswish gradient, PyTorch's: 0 below -3, `x / 3 + 1 / 2` from -3 to 3 (both
/// included), 1 above; multiplied into `grad`.
pub fn hardswish_backward_in_place(input: &[f32], grad: &mut [f32]) {
    grad.par_chunks_mut(1 << 14)
        .zip(input.par_chunks(1 << 14))
        .for_each(|(d, x)| hardswish_grad_chunk(x, d));
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn hardswish_chunk(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v *= (*v + 3.0).clamp(0.0, 6.0) / 6.0;
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn hardswish_grad_chunk(input: &[f32], grad: &mut [f32]) {
    for (d, &x) in grad.iter_mut().zip(input) {
        let slope = if x < -3.0 {
            0.0
        } else if x <= 3.0 {
            x / 3.0 + 0.5
        } else {
            1.0
        };
        *d *= slope;
    }
}

/// Exact GELU `x * Φ(x)` in place, `Φ(x) = (1 + erf(x / sqrt 2)) / 2`.
pub fn gelu_in_place(x: &mut [f32]) {
    x.par_chunks_mut(1 << 14).for_each(gelu_chunk);
}

/// The GELU gradient `Φ(x) + x φ(x)` (`φ` the standard normal density), multiplied into
/// `grad`.
pub fn gelu_backward_in_place(input: &[f32], grad: &mut [f32]) {
    grad.par_chunks_mut(1 << 14)
        .zip(input.par_chunks(1 << 14))
        .for_each(|(d, x)| gelu_grad_chunk(x, d));
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn gelu_chunk(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v *= normal_cdf(*v);
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn gelu_grad_chunk(input: &[f32], grad: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for (d, &x) in grad.iter_mut().zip(input) {
        let density = INV_SQRT_2PI * exp_approx(-0.5 * x * x);
        *d *= normal_cdf(x) + x * density;
    }
}

/// `Φ(x) = (1 + erf(x / sqrt 2)) / 2` through Abramowitz and Stegun's 7.1.26 for `erf`
/// (absolute error under 1.5e-7), branch-free so that loops over it vectorise.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let mut p = 1.061_405_4_f32;
    p = p * t - 1.453_152_1;
    p = p * t + 1.421_413_8;
    p = p * t - 0.284_496_72;
    p = p * t + 0.254_829_6;
    let erf_abs = 1.0 - p * t * exp_approx(-a * a);
    0.5 + 0.5 * erf_abs.copysign(z)
}

/// `exp(x)` to about 1e-7 relative, branch-free so that loops over it vectorise (libm's
/// `expf` is a scalar call per element). Cephes' `expf`: `x = n ln 2 + r`, a degree-5
/// polynomial for `exp(r)`, `2^n` through the exponent bits; the input is clamped to where
/// the result stays finite and normal.
#[inline(always)]
pub(crate) fn exp_approx(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    // Fused multiply-adds throughout: Rust does not contract `a * b + c` on its own, and
    // the separate multiply and add doubled the latency of the polynomial's chain.
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = p.mul_add(r, c);
    }
    let y = (p * r).mul_add(r, r + 1.0);
    // 2^n through the exponent bits. Adding 1.5 * 2^23 leaves n + 127 as an integer in the
    // low mantissa bits, and the shift drops the rest: a conversion that vectorises, where
    // `as i32` saturates lane by lane (it made SiLU a third of EfficientNet's inference).
    let biased = (n + (12_582_912.0 + 127.0)).to_bits();
    y * f32::from_bits(biased << 23)
}

/// `[batch, channels, inner]` view of a tensor of any rank >= 2, as BatchNorm sees it.
#[derive(Debug, Clone, Copy)]
pub struct ChannelLayout {
    pub batch: usize,
    pub channels: usize,
    pub inner: usize,
}

impl ChannelLayout {
    pub fn new(shape: &[usize]) -> Self {
        Self {
            batch: shape[0],
            channels: shape[1],
            inner: shape[2..].iter().product(),
        }
    }

    fn count(&self) -> usize {
        self.batch * self.inner
    }

    /// The `inner`-long runs of channel `c`, one per image.
    fn runs<'a>(&self, data: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> {
        let (stride, inner) = (self.channels * self.inner, self.inner);
        (0..self.batch).map(move |n| &data[n * stride + c * inner..][..inner])
    }
}

/// Batch mean and biased variance per channel (two passes, accumulated in f64).
pub fn batch_norm_stats(l: &ChannelLayout, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let count = l.count().max(1) as f64;
    (0..l.channels)
        .into_par_iter()
        .map(|c| {
            let sum: f64 = l.runs(x, c).map(|r| sum_f32(r) as f64).sum();
            let mean = sum / count;
            let squares: f64 = l
                .runs(x, c)
                .map(|r| centred_squares(r, mean as f32) as f64)
                .sum();
            (mean as f32, (squares / count) as f32)
        })
        .unzip()
}

/// `y = x * scale[c] + shift[c]`, written over `x`.
pub fn scale_shift_in_place(l: &ChannelLayout, x: &mut [f32], scale: &[f32], shift: &[f32]) {
    x.par_chunks_mut(l.inner).enumerate().for_each(|(i, run)| {
        let c = i % l.channels;
        affine(run, scale[c], shift[c]);
    });
}

/// Per channel `(sum(dy), sum(dy * x))`: the gradients of shift and scale in
/// `y = x * scale + shift`.
pub fn channel_affine_sums(l: &ChannelLayout, x: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    (0..l.channels)
        .into_par_iter()
        .map(|c| {
            let (mut dy_sum, mut dy_x) = (0f64, 0f64);
            for (xr, dyr) in l.runs(x, c).zip(l.runs(grad, c)) {
                dy_sum += sum_f32(dyr) as f64;
                dy_x += centred_dot(dyr, xr, 0.0) as f64;
            }
            (dy_sum as f32, dy_x as f32)
        })
        .unzip()
}

/// BatchNorm backward with batch statistics. Returns `(dgamma, dbeta)` and writes the
/// input gradient over `grad`:
/// `dx = gamma * inv_std * (dy - mean(dy) - x_hat * mean(dy * x_hat))`.
pub fn batch_norm_backward_in_place(
    l: &ChannelLayout,
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    grad: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let sums: Vec<(f32, f32)> = (0..l.channels)
        .into_par_iter()
        .map(|c| {
            let (mut dy_sum, mut dy_centred) = (0f64, 0f64);
            for (xr, dyr) in l.runs(x, c).zip(l.runs(grad, c)) {
                dy_sum += sum_f32(dyr) as f64;
                dy_centred += centred_dot(dyr, xr, mean[c]) as f64;
            }
            // sum(dy * x_hat) = inv_std * sum(dy * (x - mean))
            (dy_sum as f32, (inv_std[c] as f64 * dy_centred) as f32)
        })
        .collect();
    let count = l.count().max(1) as f32;
    grad.par_chunks_mut(l.inner)
        .zip(x.par_chunks(l.inner))
        .enumerate()
        .for_each(|(i, (dy, x))| {
            let c = i % l.channels;
            let (dy_sum, dy_xhat) = sums[c];
            let k = gamma[c] * inv_std[c];
            // dx = k * dy - k * dy_sum / count - k * inv_std * dy_xhat / count * (x - mean)
            let a = k * inv_std[c] * dy_xhat / count;
            let b = -k * dy_sum / count + a * mean[c];
            batch_norm_grad_run(dy, x, k, a, b);
        });
    sums.into_iter()
        .map(|(dy_sum, dy_xhat)| (dy_xhat, dy_sum))
        .unzip()
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn sum_f32(x: &[f32]) -> f32 {
    sum16(x, x, |v, _| v)
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn centred_squares(x: &[f32], mean: f32) -> f32 {
    sum16(x, x, |v, _| (v - mean) * (v - mean))
}

/// `sum(dy * (x - mean))`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn centred_dot(dy: &[f32], x: &[f32], mean: f32) -> f32 {
    sum16(dy, x, |d, v| d * (v - mean))
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn affine(x: &mut [f32], scale: f32, shift: f32) {
    for v in x {
        *v = *v * scale + shift;
    }
}

/// `dy = k * dy - a * x + b` on one run.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn batch_norm_grad_run(dy: &mut [f32], x: &[f32], k: f32, a: f32, b: f32) {
    for (d, &x) in dy.iter_mut().zip(x) {
        *d = k * *d - a * x + b;
    }
}

/// Rows per unit of LayerNorm work, and per partial sum of its parameter gradients: the
/// partials are added in row order whatever the thread count, so the gradients are the
/// same bit for bit on any number of threads.
const LAYER_NORM_BLOCK: usize = 32;

/// LayerNorm over rows of `width`: `y = (x - mean) * rstd * gamma + beta`, with each row's
/// mean and `rstd = 1 / sqrt(biased variance + eps)` returned for the backward pass (two
/// passes over the row, as PyTorch's CPU kernel, not a running variance).
pub fn layer_norm_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let rows = x.len() / width;
    let (mut y, mut mean, mut rstd) = (vec![0f32; x.len()], vec![0f32; rows], vec![0f32; rows]);
    let block = LAYER_NORM_BLOCK * width;
    y.par_chunks_mut(block)
        .zip(x.par_chunks(block))
        .zip(mean.par_chunks_mut(LAYER_NORM_BLOCK))
        .zip(rstd.par_chunks_mut(LAYER_NORM_BLOCK))
        .for_each(|(((y, x), mean), rstd)| {
            for (i, (y, x)) in y.chunks_mut(width).zip(x.chunks(width)).enumerate() {
                let m = sum_f32(x) / width as f32;
                let var = centred_squares(x, m) / width as f32;
                let r = (1.0 / (var as f64 + epsilon).sqrt()) as f32;
                layer_norm_row(y, x, m, r, gamma, beta);
                (mean[i], rstd[i]) = (m, r);
            }
        });
    (y, mean, rstd)
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn layer_norm_row(y: &mut [f32], x: &[f32], mean: f32, rstd: f32, gamma: &[f32], beta: &[f32]) {
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *y = (x - mean) * rstd * g + b;
    }
}

/// LayerNorm backward. Writes the input gradient over `grad`,
/// `dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat))` with `g = dy * gamma`, and
/// returns `(dgamma, dbeta) = (sum(dy * x_hat), sum(dy))` over the rows.
pub fn layer_norm_backward_in_place(
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    rstd: &[f32],
    grad: &mut [f32],
) -> (Vec<f32>, Vec<f32>) {
    let width = gamma.len();
    let block = LAYER_NORM_BLOCK * width;
    let blocks = x.len().div_ceil(block);
    // Per block: dgamma then dbeta partials.
    let mut partials = vec![0f32; blocks * 2 * width];
    partials
        .par_chunks_mut(2 * width)
        .zip(grad.par_chunks_mut(block))
        .zip(x.par_chunks(block))
        .zip(
            mean.par_chunks(LAYER_NORM_BLOCK)
                .zip(rstd.par_chunks(LAYER_NORM_BLOCK)),
        )
        .for_each_init(Vec::new, |g, (((sums, dy), x), (mean, rstd))| {
            let (dgamma, dbeta) = sums.split_at_mut(width);
            g.resize(width, 0.0);
            for (i, (dy, x)) in dy.chunks_mut(width).zip(x.chunks(width)).enumerate() {
                layer_norm_grad_row(dy, x, mean[i], rstd[i], gamma, g, dgamma, dbeta);
            }
        });
    let mut dgamma = vec![0f32; width];
    let mut dbeta = vec![0f32; width];
    for part in partials.chunks_exact(2 * width) {
        let (pg, pb) = part.split_at(width);
        dgamma.iter_mut().zip(pg).for_each(|(d, v)| *d += v);
        dbeta.iter_mut().zip(pb).for_each(|(d, v)| *d += v);
    }
    (dgamma, dbeta)
}

/// One row of [`layer_norm_backward_in_place`]: adds the row's terms to `dgamma` and
/// `dbeta`, then overwrites `dy` with the input gradient (`g` is scratch).
#[allow(clippy::too_many_arguments)]
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn layer_norm_grad_row(
    dy: &mut [f32],
    x: &[f32],
    mean: f32,
    rstd: f32,
    gamma: &[f32],
    g: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    let width = dy.len() as f32;
    for (((g, &d), &gm), db) in g.iter_mut().zip(&*dy).zip(gamma).zip(dbeta.iter_mut()) {
        *g = d * gm;
        *db += d;
    }
    for ((dg, &d), &x) in dgamma.iter_mut().zip(&*dy).zip(x) {
        *dg += d * (x - mean) * rstd;
    }
    let g_mean = sum16(g, g, |v, _| v) / width;
    let gx_mean = sum16(g, x, |v, x| v * (x - mean)) * rstd / width;
    for ((d, &g), &x) in dy.iter_mut().zip(&*g).zip(x) {
        *d = rstd * (g - g_mean - (x - mean) * rstd * gx_mean);
    }
}

/// Max pooling forward; padding never wins and NaN propagates, as in PyTorch.
pub fn max_pool_forward(g: &ConvGeometry, x: &[f32]) -> Vec<f32> {
    let mut y = vec![f32::NEG_INFINITY; g.batch * g.cin * g.out_plane()];
    y.par_chunks_mut(g.out_plane())
        .zip(x.par_chunks(g.in_plane()))
        .for_each(|(y, x)| max_pool_plane(g, x, y));
    y
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn max_pool_plane(g: &ConvGeometry, x: &[f32], y: &mut [f32]) {
    for oy in 0..g.oh {
        let y_row = &mut y[oy * g.ow..][..g.ow];
        for (_, iy) in g.window_rows(oy) {
            let x_row = &x[iy * g.w..][..g.w];
            for kx in 0..g.kw {
                let (lo, hi, ix) = g.column_span(kx);
                for (m, &v) in y_row[lo..hi]
                    .iter_mut()
                    .zip(x_row[ix..].iter().step_by(g.sw))
                {
                    *m = if v > *m || v.is_nan() { v } else { *m };
                }
            }
        }
    }
}

/// Max pooling input gradient: each output's gradient goes to the first maximum of its
/// window in row-major order (PyTorch's choice on ties), recomputed from the input.
pub fn max_pool_backward(g: &ConvGeometry, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let mut dx = vec![0f32; g.batch * g.cin * g.in_plane()];
    dx.par_chunks_mut(g.in_plane())
        .zip(x.par_chunks(g.in_plane()))
        .zip(grad.par_chunks(g.out_plane()))
        .for_each(|((dx, x), dy)| {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let mut best: Option<(usize, f32)> = None;
                    for (_, iy) in g.window_rows(oy) {
                        for kx in 0..g.kw {
                            let Some(ix) = (ox * g.sw + kx).checked_sub(g.pad_left) else {
                                continue;
                            };
                            if ix >= g.w {
                                continue;
                            }
                            let v = x[iy * g.w + ix];
                            if best.is_none_or(|(_, m)| v > m || v.is_nan() && !m.is_nan()) {
                                best = Some((iy * g.w + ix, v));
                            }
                        }
                    }
                    if let Some((i, _)) = best {
                        dx[i] += dy[oy * g.ow + ox];
                    }
                }
            }
        });
    dx
}
