//! Pointwise (1x1, stride 1) convolutions as a direct register-blocked kernel, on x86 CPUs
//! with AVX2 and FMA but not AVX-512, where gemm's 512-bit kernels keep the job: a tile of
//! 12 channels by 32 pixels in 512-bit registers ran level with them on AMD Zen 4
//! (0.92-1.07x, BENCHMARKS.md), the packing of the input the same work either way.
//!
//! Per image a pointwise convolution is `Y [cout, P] = W [cout, cin] X [cin, P]`. A tile
//! of [`ROWS`] output channels by [`COLS`] pixels is summed in registers: the bias first,
//! then the products in input-channel order, so the bits do not depend on how the work is
//! split over threads or blocks. The weights are packed once per convolution (gemm packs
//! them for every product), the input once per block of columns, and the activation is
//! applied to each tile before it is stored (gemm left the bias and activation to passes
//! of their own). These convolutions carry most of the FLOPs of MobileNet, EfficientNet
//! and the ResNet bottlenecks.

use super::{ConvGeometry, OutputActivation, store_block, uninit_output, written};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::mem::MaybeUninit;
use std::ops::Range;

/// Output channels per tile: with [`COLS`], twelve 256-bit accumulators, two registers
/// for a row of the input and one broadcast weight, inside AVX2's sixteen.
const ROWS: usize = 6;
/// Pixels per tile: two 256-bit registers.
const COLS: usize = 16;

/// Floats of the input one block of columns packs (all `cin` rows of it): 128 KiB, inside
/// every core's L2, so that every tile reads its strips from there.
const BLOCK_FLOATS: usize = 32 * 1024;

/// The fewest columns (pixels of all images) worth the kernel: the last tile is padded to
/// [`COLS`] columns, which on one image's 1x1 squeeze-and-excitation input is fifteen
/// sixteenths of the work. From 128 columns the padding is at most an eighth; fewer go
/// to gemm.
const MIN_COLUMNS: usize = 8 * COLS;

/// Whether [`forward`] takes this convolution: one group, 1x1, stride 1, no padding,
/// at least [`MIN_COLUMNS`] columns, on a CPU it is chosen for.
pub(super) fn covers(g: &ConvGeometry) -> bool {
    g.groups == 1
        && g.is_pointwise()
        && g.batch * g.in_plane() >= MIN_COLUMNS
        && runs_here()
        && !is_x86_feature_detected!("avx512f")
}

/// Whether this CPU can run the kernel at all.
fn runs_here() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// `activation(W x + bias)` for every image of `x`, NCHW. The columns of all images are
/// one sequence, cut into blocks that threads take in turn: the small planes of the last
/// stages (7x7, or the 1x1 of squeeze-and-excitation) make whole tiles across images.
pub(super) fn forward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: OutputActivation,
) -> Vec<f32> {
    assert!(g.groups == 1 && g.is_pointwise() && runs_here());
    let (cin, cout, p) = (g.cin, g.cout, g.in_plane());
    let tiles = pack(weight, bias, cout, cin);
    let columns = g.batch * p;
    // Blocks that fit the budget, and at least four per thread so that none waits long.
    let per_thread = columns.div_ceil(4 * rayon::current_num_threads());
    let block = (BLOCK_FLOATS / cin)
        .min(per_thread)
        .next_multiple_of(COLS)
        .max(COLS);
    let mut y = uninit_output(g.batch * cout * p);
    let job = Job {
        layout: Layout { cin, cout, p },
        x,
        tiles,
        activation,
        out: SharedOutput(y.as_mut_ptr(), y.len()),
    };
    (0..columns.div_ceil(block))
        .into_par_iter()
        .for_each_init(Vec::new, |strips, b| {
            let columns = b * block..((b + 1) * block).min(columns);
            // SAFETY: `runs_here`, asserted above.
            unsafe { job.block(columns, strips) };
        });
    // SAFETY: the blocks cover every column of every image, and each writes every output
    // channel of its columns.
    unsafe { written(y) }
}

/// One convolution's input, packed weights and output, shared by the threads.
struct Job<'a> {
    layout: Layout,
    x: &'a [f32],
    tiles: Vec<Tile>,
    activation: OutputActivation,
    out: SharedOutput,
}

impl Job<'_> {
    /// `columns` packed into `strips`, then every output channel of them, with the
    /// activation. The packing and stores are compiled here with the tile's instructions:
    /// compiled without them (in the closure that calls this) they were SSE moves, and
    /// MobileNetV2's inference ran 2-5% slower.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block(&self, columns: Range<usize>, strips: &mut Vec<f32>) {
        pack_strips(&self.layout, self.x, columns.clone(), strips);
        self.tile_rows(strips, columns);
    }

    /// `columns` of every output channel from their [`pack_strips`], with the activation.
    #[inline(always)]
    fn tile_rows(&self, strips: &[f32], columns: Range<usize>) {
        let layout = &self.layout;
        let strip_len = layout.cin * COLS;
        for tile in &self.tiles {
            assert_eq!(tile.weights.len() / ROWS * COLS, strip_len);
            for (s, strip) in strips.chunks_exact(strip_len).enumerate() {
                // SAFETY: `block`'s caller vouches for the CPU; the strip holds the tile's
                // rows.
                let mut acc = unsafe { tile_sums(tile, strip.as_ptr()) };
                if let Some(activation) = self.activation {
                    activation(acc.as_flattened_mut());
                }
                let first = columns.start + s * COLS;
                let strip_columns = first..(first + COLS).min(columns.end);
                for (image, pixel, offset, len) in layout.runs(strip_columns) {
                    for (r, a) in acc.iter().enumerate().take(tile.rows) {
                        let co = tile.first + r;
                        let at = (image * layout.cout + co) * layout.p + pixel;
                        // SAFETY: these columns are this block's alone.
                        let y = unsafe { self.out.run(at, len) };
                        store_block::<COLS>(y, &a[offset..offset + len]);
                    }
                }
            }
        }
    }
}

/// Channels and plane size: where column `j` of the batch (image `j / p`, pixel `j % p`)
/// lies in the input and output.
struct Layout {
    cin: usize,
    cout: usize,
    p: usize,
}

impl Layout {
    /// The runs of `columns` that lie in one image each: (image, first pixel, offset of
    /// the run in `columns`, length).
    #[inline(always)]
    fn runs(&self, columns: Range<usize>) -> impl Iterator<Item = (usize, usize, usize, usize)> {
        let (p, start) = (self.p, columns.start);
        let mut j = start;
        std::iter::from_fn(move || {
            (j < columns.end).then(|| {
                let (image, pixel) = (j / p, j % p);
                let len = (p - pixel).min(columns.end - j);
                let run = (image, pixel, j - start, len);
                j += len;
                run
            })
        })
    }
}

/// The output buffer, shared by the threads: each writes the columns of its own blocks.
struct SharedOutput(*mut MaybeUninit<f32>, usize);

// SAFETY: the threads write disjoint columns (see `run`).
unsafe impl Sync for SharedOutput {}

impl SharedOutput {
    /// `len` floats from `at`.
    ///
    /// # Safety
    /// No other thread touches them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn run(&self, at: usize, len: usize) -> &mut [MaybeUninit<f32>] {
        assert!(at + len <= self.1);
        // SAFETY: inside the buffer (the assert), and the caller vouches for exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(at), len) }
    }
}

/// [`ROWS`] output channels' weights, `[cin][ROWS]` so that each input channel's are
/// adjacent, and their biases; channels past `cout` have zeros and are never stored.
struct Tile {
    weights: Vec<f32>,
    bias: [f32; ROWS],
    /// The first of its output channels, and how many there are.
    first: usize,
    rows: usize,
}

fn pack(weight: &[f32], bias: Option<&[f32]>, cout: usize, cin: usize) -> Vec<Tile> {
    (0..cout.div_ceil(ROWS))
        .map(|t| {
            let rows = ROWS.min(cout - t * ROWS);
            let mut weights = vec![0f32; cin * ROWS];
            let mut tile_bias = [0f32; ROWS];
            for r in 0..rows {
                let co = t * ROWS + r;
                for (ci, w) in weight[co * cin..][..cin].iter().enumerate() {
                    weights[ci * ROWS + r] = *w;
                }
                tile_bias[r] = bias.map_or(0.0, |b| b[co]);
            }
            Tile {
                weights,
                bias: tile_bias,
                first: t * ROWS,
                rows,
            }
        })
        .collect()
}

/// `columns` of the batch as strips of [`COLS`] columns by all input channels, the last
/// one zero-padded. Read in place, each step of a tile's sums loaded a new cache line from
/// another input row, more rows than the prefetchers follow, and the kernel waited on
/// memory.
#[inline(always)]
fn pack_strips(layout: &Layout, x: &[f32], columns: Range<usize>, strips: &mut Vec<f32>) {
    let (cin, p) = (layout.cin, layout.p);
    let strip_len = cin * COLS;
    // Every lane is written below but the last strip's padding, zeroed here: zeroing all
    // of it first cost 1.4% of MobileNetV2's inference in `memset`.
    strips.resize(columns.len().div_ceil(COLS) * strip_len, 0.0);
    if let Some(last) = strips.rchunks_exact_mut(strip_len).next() {
        let used = (columns.len() - 1) % COLS + 1;
        for row in last.chunks_exact_mut(COLS) {
            row[used..].fill(0.0);
        }
    }
    for (image, pixel, offset, len) in layout.runs(columns) {
        for ci in 0..cin {
            let mut src = &x[(image * cin + ci) * p + pixel..][..len];
            let mut o = offset;
            while !src.is_empty() {
                let (strip, lane) = (o / COLS, o % COLS);
                let n = (COLS - lane).min(src.len());
                let to = &mut strips[strip * strip_len + ci * COLS + lane..][..n];
                // A whole strip as an array: a copy of constant length is two vector
                // moves, one of variable length a call to `memmove`.
                match <&[f32; COLS]>::try_from(&src[..n]) {
                    Ok(whole) => *to.first_chunk_mut::<COLS>().expect("a strip") = *whole,
                    Err(_) => to.copy_from_slice(&src[..n]),
                }
                (src, o) = (&src[n..], o + n);
            }
        }
    }
}

/// The tile's sums over one strip, in AVX2 registers. Intrinsics: the compiler turned
/// plain loops over arrays, inlined into a caller, into scalar code that kept the sums in
/// memory (8x slower).
///
/// # Safety
/// The CPU has AVX2 and FMA; `strip` is valid for the tile's `cin` rows of `COLS` floats.
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_sums(tile: &Tile, strip: *const f32) -> [[f32; COLS]; ROWS] {
    const HALF: usize = COLS / 2;
    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
    for (a, &b) in acc.iter_mut().zip(&tile.bias) {
        *a = [_mm256_set1_ps(b); 2];
    }
    for (ci, w) in tile.weights.chunks_exact(ROWS).enumerate() {
        // SAFETY: the caller vouches for row `ci`'s COLS floats.
        let (x0, x1) = unsafe {
            let row = strip.add(ci * COLS);
            (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(HALF)))
        };
        for (a, w) in acc.iter_mut().zip(w) {
            let w = _mm256_broadcast_ss(w);
            a[0] = _mm256_fmadd_ps(w, x0, a[0]);
            a[1] = _mm256_fmadd_ps(w, x1, a[1]);
        }
    }
    let mut out = [[0f32; COLS]; ROWS];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: each row of `out` holds COLS floats.
        unsafe {
            _mm256_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm256_storeu_ps(o.as_mut_ptr().add(HALF), a[1]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::ops::ConvOptions;

    fn values(n: usize, phase: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + phase).sin()).collect()
    }

    /// A pointwise geometry over `[batch, cin, h, w]` with `cout` outputs.
    fn geometry(x: [usize; 4], cout: usize) -> ConvGeometry {
        let options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
        ConvGeometry::new(x, [cout, x[1], 1, 1], &options).expect("a pointwise geometry")
    }

    /// Input shapes and output channels: partial tiles and strips, strips across images,
    /// several blocks, one image, and the 1x1 planes of squeeze-and-excitation.
    const CASES: [([usize; 4], usize); 5] = [
        ([2, 7, 12, 13], 13),
        ([1, 300, 12, 13], 7),
        ([3, 5, 16, 8], 6),
        ([3, 4, 7, 7], 9),
        ([150, 24, 1, 1], 10),
    ];

    /// Against the sums in f64, on every CPU the kernel runs on (whether or not `covers`
    /// chooses it there).
    #[test]
    fn forward_matches_the_sums() {
        assert!(runs_here(), "the test machines have AVX2 and FMA");
        for (x_shape, cout) in CASES {
            let g = geometry(x_shape, cout);
            let (cin, p) = (g.cin, g.in_plane());
            let x = values(g.batch * cin * p, 0.1);
            let w = values(cout * cin, 0.7);
            let bias = values(cout, 0.3);
            let relu: fn(&mut [f32]) = super::super::relu_chunk;
            let y = forward(&g, &x, &w, Some(&bias), Some(relu));
            for (at, &got) in y.iter().enumerate() {
                let (n, co, px) = (at / (cout * p), at / p % cout, at % p);
                let sum = (0..cin).fold(bias[co] as f64, |s, ci| {
                    s + w[co * cin + ci] as f64 * x[(n * cin + ci) * p + px] as f64
                });
                let want = sum.max(0.0);
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{x_shape:?}: image {n}, channel {co}, pixel {px}: {got} vs {want}"
                );
            }
        }
    }

    /// The same bits on one thread and on several (the blocks of columns are cut at other
    /// places), with fewer images than threads and more.
    #[test]
    fn bits_do_not_depend_on_the_thread_count() {
        assert!(runs_here(), "the test machines have AVX2 and FMA");
        for batch in [1, 5] {
            let g = geometry([batch, 9, 14, 11], 20);
            let x = values(batch * 9 * g.in_plane(), 0.2);
            let w = values(20 * 9, 0.5);
            let run = |threads| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a pool");
                let y = pool.install(|| forward(&g, &x, &w, None, None));
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            let one = run(1);
            for threads in [2, 3, 7] {
                assert!(
                    run(threads) == one,
                    "batch {batch}: {threads} threads differ from 1"
                );
            }
        }
    }
}
