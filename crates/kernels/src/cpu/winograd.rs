//! Winograd F(4x4, 3x3) (Lavin and Gray, 2016): each 4x4 output tile is computed from a
//! 6x6 input tile with 36 multiplications per input channel instead of 144. The products
//! become 36 matrix products, one per position of the transformed tile, over all tiles of
//! the batch at once:
//!   U = G g G^T (weights), V = B^T d B (input tiles), M = U V (per position), Y = A^T M A,
//! with the interpolation points 0, 1, -1, 2, -2 and infinity. Layouts keep each matrix
//! product's operands strided views: U [cout][36][cin], V [cin][36][tiles],
//! M [cout][36][tiles].
//!
//! The transforms run on [`LANES`] filters, or tiles, at once, one per vector lane: one
//! tile at a time they were scalar code with 36 scattered loads or stores per tile, and
//! took more of ResNet-18's inference than the products.

use super::{ConvGeometry, MatRef, OutputActivation, matmul_uninit, uninit_output, written};
use gemm::Parallelism;
use multiversion::multiversion;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::{Add, Div, Mul, Neg, Sub};

/// Output tile side.
const TILE: usize = 4;
/// Transformed tile side and number of positions.
const SIDE: usize = 6;
const POSITIONS: usize = SIDE * SIDE;

/// Filters or tiles transformed at once: one 512-bit register, or two 256-bit ones.
const LANES: usize = 16;

/// One value of [`LANES`] filters or tiles, so that a transform written for one runs on
/// all of them as vector instructions: plain loops over an array, which the callers'
/// `multiversion` builds vectorise for each instruction set (`std::simd` is nightly-only,
/// and no crate in the tree offers a portable f32x16 with these operators).
#[derive(Clone, Copy)]
struct Lanes([f32; LANES]);

impl Lanes {
    /// `f` applied lane by lane. Plain loops over the arrays: `std::array::from_fn` and
    /// `map` left a call per element in the hot loops.
    #[inline(always)]
    fn zip(mut self, other: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = f(*a, b);
        }
        self
    }

    #[inline(always)]
    fn each(mut self, f: impl Fn(f32) -> f32) -> Self {
        for a in &mut self.0 {
            *a = f(*a);
        }
        self
    }
}

impl Add for Lanes {
    type Output = Self;
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.zip(other, |a, b| a + b)
    }
}

impl Sub for Lanes {
    type Output = Self;
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self.zip(other, |a, b| a - b)
    }
}

impl Neg for Lanes {
    type Output = Self;
    #[inline(always)]
    fn neg(self) -> Self {
        self.each(|a| -a)
    }
}

impl Mul<f32> for Lanes {
    type Output = Self;
    #[inline(always)]
    fn mul(self, k: f32) -> Self {
        self.each(|a| a * k)
    }
}

impl Div<f32> for Lanes {
    type Output = Self;
    #[inline(always)]
    fn div(self, k: f32) -> Self {
        self.each(|a| a / k)
    }
}

/// What the transforms compute on: one filter's or tile's values, or [`Lanes`] of them.
/// Both give the same bits: the same operations in the same order.
trait Value:
    Copy
    + Add<Output = Self>
    + Sub<Output = Self>
    + Neg<Output = Self>
    + Mul<f32, Output = Self>
    + Div<f32, Output = Self>
{
}

impl<T> Value for T where
    T: Copy
        + Add<Output = T>
        + Sub<Output = T>
        + Neg<Output = T>
        + Mul<f32, Output = T>
        + Div<f32, Output = T>
{
}

/// `G x` for one filter column or row.
#[inline(always)]
fn filter_1d<T: Value>([g0, g1, g2]: [T; 3]) -> [T; SIDE] {
    let even = g0 + g2;
    [
        g0 * 0.25,
        -(even + g1) / 6.0,
        -(even - g1) / 6.0,
        g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
        g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
        g2,
    ]
}

/// `B^T x` for one input-tile column or row.
#[inline(always)]
fn input_1d<T: Value>([d0, d1, d2, d3, d4, d5]: [T; SIDE]) -> [T; SIDE] {
    [
        d0 * 4.0 - d2 * 5.0 + d4,
        -((d1 + d2) * 4.0) + d3 + d4,
        (d1 - d2) * 4.0 - d3 + d4,
        (d3 - d1) * 2.0 - d2 + d4,
        (d1 - d3) * 2.0 - d2 + d4,
        d1 * 4.0 - d3 * 5.0 + d5,
    ]
}

/// `A^T x` for one transformed column or row.
#[inline(always)]
fn output_1d<T: Value>([m0, m1, m2, m3, m4, m5]: [T; SIDE]) -> [T; TILE] {
    let (sum12, diff12, sum34, diff34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + sum12 + sum34,
        diff12 + diff34 * 2.0,
        sum12 + sum34 * 4.0,
        diff12 + diff34 * 8.0 + m5,
    ]
}

/// `G g G^T` for one 3x3 filter, row-major.
#[inline(always)]
fn filter_tile<T: Value>(g: &[T; 9]) -> [T; POSITIONS] {
    let mut columns = [[g[0]; SIDE]; 3];
    for (c, column) in columns.iter_mut().enumerate() {
        *column = filter_1d([g[c], g[3 + c], g[6 + c]]);
    }
    let mut u = [g[0]; POSITIONS];
    for (r, row) in u.chunks_exact_mut(SIDE).enumerate() {
        row.copy_from_slice(&filter_1d([columns[0][r], columns[1][r], columns[2][r]]));
    }
    u
}

/// A 3x3 stride-1 dense convolution by Winograd F(4x4, 3x3).
pub(super) fn forward(
    g: &ConvGeometry,
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    activation: OutputActivation,
) -> Vec<f32> {
    let tiles = Tiles::new(g);
    let all_tiles = g.batch * tiles.count;

    let mut u = uninit_output(g.cout * POSITIONS * g.cin);
    u.par_chunks_mut(POSITIONS * g.cin)
        .zip(weight.par_chunks(g.cin * 9))
        .for_each(|(u, w)| transform_filters(g.cin, w, u));
    // SAFETY: each output channel's filters filled its row for every input channel.
    let u = unsafe { written(u) };

    let mut v = uninit_output(g.cin * POSITIONS * all_tiles);
    v.par_chunks_mut(POSITIONS * all_tiles)
        .enumerate()
        .for_each(|(ci, v)| transform_input_channel(g, &tiles, x, ci, v));
    // SAFETY: each input channel wrote every tile of every image at every position.
    let v = unsafe { written(v) };

    let mut m = uninit_output(g.cout * POSITIONS * all_tiles);
    let threads = Parallelism::Rayon(rayon::current_num_threads());
    for xi in 0..POSITIONS {
        let lhs = MatRef {
            data: &u[xi * g.cin..],
            row_stride: (POSITIONS * g.cin) as isize,
            col_stride: 1,
        };
        let rhs = MatRef {
            data: &v[xi * all_tiles..],
            row_stride: (POSITIONS * all_tiles) as isize,
            col_stride: 1,
        };
        let out = &mut m[xi * all_tiles..];
        let dims = (g.cout, all_tiles, g.cin);
        matmul_uninit(out, POSITIONS * all_tiles, lhs, rhs, dims, threads);
    }
    // SAFETY: the products wrote every position of every output channel.
    let m = unsafe { written(m) };

    let mut y = uninit_output(g.batch * g.cout * g.out_plane());
    y.par_chunks_mut(g.out_plane())
        .enumerate()
        .for_each_init(Vec::new, |scratch, (plane, y)| {
            let (n, co) = (plane / g.cout, plane % g.cout);
            let m = &m[co * POSITIONS * all_tiles..][..POSITIONS * all_tiles];
            let b = bias.map_or(0.0, |b| b[co]);
            let m = (&m[n * tiles.count..], all_tiles);
            transform_output_plane(g, &tiles, m, b, scratch, y);
            if let Some(activation) = activation {
                // SAFETY: the tiles covered the whole plane.
                activation(unsafe { y.assume_init_mut() });
            }
        });
    // SAFETY: every plane was written above.
    unsafe { written(y) }
}

/// How one image's output is cut into tiles, and the zero-padded input plane they read.
struct Tiles {
    /// Tiles per row and per column.
    across: usize,
    down: usize,
    /// Tiles per image.
    count: usize,
    /// Width and height of the padded input plane: the tiles' inputs, borders included.
    padded_w: usize,
    padded_h: usize,
    /// The length of a scratch row that holds one value per tile of an image, in whole
    /// [`Lanes`] and one more, so that a load or store of a register from any tile stays
    /// inside it.
    span: usize,
}

impl Tiles {
    fn new(g: &ConvGeometry) -> Self {
        let (across, down) = (g.ow.div_ceil(TILE), g.oh.div_ceil(TILE));
        Self {
            across,
            down,
            count: across * down,
            padded_w: across * TILE + SIDE - TILE,
            padded_h: down * TILE + SIDE - TILE,
            span: (across * down).next_multiple_of(LANES) + LANES,
        }
    }
}

/// `LANES` floats from the start of `src`.
#[inline(always)]
fn load(src: &[f32]) -> Lanes {
    Lanes(src[..LANES].try_into().expect("a whole register"))
}

/// Column `x` of a transformed row split into [`TILE`] phases, `x = TILE * tx + phase`:
/// where it goes in a `[phase][span]` block, so that every tile's column `c` is a
/// contiguous run over the tiles of the row (phase `c % TILE`, from `c / TILE`).
#[inline(always)]
fn phase_index(x: usize, span: usize) -> usize {
    x % TILE * span + x / TILE
}

/// `U = G g G^T` of one output channel's filters (`w`, `[cin][9]`) into `u`, `[36][cin]`.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn transform_filters(cin: usize, w: &[f32], u: &mut [MaybeUninit<f32>]) {
    let full = cin / LANES * LANES;
    for ci in (0..full).step_by(LANES) {
        let mut g = [Lanes([0.0; LANES]); 9];
        for (l, filter) in w[ci * 9..][..LANES * 9].chunks_exact(9).enumerate() {
            for (g, &w) in g.iter_mut().zip(filter) {
                g.0[l] = w;
            }
        }
        for (xi, value) in filter_tile(&g).into_iter().enumerate() {
            u[xi * cin + ci..][..LANES].write_copy_of_slice(&value.0);
        }
    }
    for ci in full..cin {
        let g = w[ci * 9..][..9].try_into().expect("nine taps");
        for (xi, value) in filter_tile(g).into_iter().enumerate() {
            u[xi * cin + ci].write(value);
        }
    }
}

/// Transformed tiles of input channel `ci`, all images: `v` is `[36][images * tiles]`.
/// Each plane is copied into a zero-padded one, then transformed a row of tiles at a
/// time: `B^T` down the columns of its six input rows, all columns at once, then `B`
/// along each transformed row, all tiles of the row at once.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn transform_input_channel(
    g: &ConvGeometry,
    tiles: &Tiles,
    x: &[f32],
    ci: usize,
    v: &mut [MaybeUninit<f32>],
) {
    let all_tiles = v.len() / POSITIONS;
    let (span, across) = (tiles.span, tiles.across);
    // Padded rows are `wide` apart, in whole registers; a row's phases `phase` apart.
    let wide = tiles.padded_w.next_multiple_of(LANES);
    let phase = across.next_multiple_of(LANES) + LANES;
    // The image goes to the same place in every plane, so the zeros around it stay.
    let mut padded = vec![0f32; tiles.padded_h * wide];
    let mut columns = vec![0f32; SIDE * wide];
    let mut phases = vec![0f32; SIDE * TILE * phase];
    let mut out = vec![0f32; POSITIONS * span];
    let (rows, cols) = (
        g.h.min(tiles.padded_h - g.pad_top),
        g.w.min(tiles.padded_w - g.pad_left),
    );
    for n in 0..g.batch {
        let plane = &x[(n * g.cin + ci) * g.in_plane()..][..g.in_plane()];
        for iy in 0..rows {
            let dst = &mut padded[(iy + g.pad_top) * wide + g.pad_left..][..cols];
            dst.copy_from_slice(&plane[iy * g.w..][..cols]);
        }
        for ty in 0..tiles.down {
            let band = &padded[ty * TILE * wide..][..SIDE * wide];
            for x in (0..wide).step_by(LANES) {
                let d = std::array::from_fn(|r| load(&band[r * wide + x..]));
                for (k, value) in input_1d(d).into_iter().enumerate() {
                    columns[k * wide + x..][..LANES].copy_from_slice(&value.0);
                }
            }
            for (k, phases) in phases.chunks_exact_mut(TILE * phase).enumerate() {
                for (x, &value) in columns[k * wide..][..tiles.padded_w].iter().enumerate() {
                    phases[phase_index(x, phase)] = value;
                }
            }
            // Whole registers: what spills past the row's last tile is overwritten by the
            // next row's, or lies in the slack at the end.
            let row = ty * across;
            for (k, phases) in phases.chunks_exact(TILE * phase).enumerate() {
                let column = |c: usize, tx: usize| load(&phases[phase_index(c, phase) + tx..]);
                for tx in (0..across).step_by(LANES) {
                    let d = std::array::from_fn(|c| column(c, tx));
                    for (j, value) in input_1d(d).into_iter().enumerate() {
                        let at = (k * SIDE + j) * span + row + tx;
                        out[at..][..LANES].copy_from_slice(&value.0);
                    }
                }
            }
        }
        let first = n * tiles.count;
        for (xi, out) in out.chunks_exact(span).enumerate() {
            v[xi * all_tiles + first..][..tiles.count].write_copy_of_slice(&out[..tiles.count]);
        }
    }
}

/// `Y = A^T M A` for one output plane, plus `bias`: `m` holds its tiles' products from
/// position 0, positions `stride` apart. `A^T` over each column's positions, then along
/// each row's, for all tiles of the plane at once; then the tiles' columns are
/// interleaved into the plane's rows. `scratch` is reused between calls.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn transform_output_plane(
    g: &ConvGeometry,
    tiles: &Tiles,
    (m, stride): (&[f32], usize),
    bias: f32,
    scratch: &mut Vec<f32>,
    y: &mut [MaybeUninit<f32>],
) {
    let span = tiles.span;
    scratch.resize((SIDE + TILE) * TILE * span, 0.0);
    let (columns, out) = scratch.split_at_mut(TILE * SIDE * span);
    let full = tiles.count / LANES * LANES;
    for t in (0..full).step_by(LANES) {
        output_lanes(|xi| load(&m[xi * stride + t..]), t, span, columns, out);
    }
    if full < tiles.count {
        let n = tiles.count - full;
        let mut tail = [Lanes([0.0; LANES]); POSITIONS];
        for (xi, p) in tail.iter_mut().enumerate() {
            p.0[..n].copy_from_slice(&m[xi * stride + full..][..n]);
        }
        output_lanes(|xi| tail[xi], full, span, columns, out);
    }
    for (oy, row) in y.chunks_exact_mut(g.ow).enumerate() {
        let out = &out[oy % TILE * TILE * span + oy / TILE * tiles.across..];
        for (tx, tile) in row.chunks_mut(TILE).enumerate() {
            for (i, d) in tile.iter_mut().enumerate() {
                d.write(out[i * span + tx] + bias);
            }
        }
    }
}

/// Both passes of `A^T M A` for the [`LANES`] tiles from `t`, `products(xi)` their values
/// at position `xi`: `A^T` down the columns into `columns` (`[row][column][span]`), then
/// along the rows into `out` (`[row][column][span]`).
#[inline(always)]
fn output_lanes(
    products: impl Fn(usize) -> Lanes,
    t: usize,
    span: usize,
    columns: &mut [f32],
    out: &mut [f32],
) {
    for j in 0..SIDE {
        let mut d = [Lanes([0.0; LANES]); SIDE];
        for (k, d) in d.iter_mut().enumerate() {
            *d = products(k * SIDE + j);
        }
        for (r, value) in output_1d(d).into_iter().enumerate() {
            columns[(r * SIDE + j) * span + t..][..LANES].copy_from_slice(&value.0);
        }
    }
    for r in 0..TILE {
        let mut d = [Lanes([0.0; LANES]); SIDE];
        for (j, d) in d.iter_mut().enumerate() {
            *d = load(&columns[(r * SIDE + j) * span + t..]);
        }
        for (i, value) in output_1d(d).into_iter().enumerate() {
            out[(r * TILE + i) * span + t..][..LANES].copy_from_slice(&value.0);
        }
    }
}
