//! Scaled dot-product attention `softmax(q k^T * scale + bias) v` in blocks of query rows,
//! with a hand-written backward. The forward keeps only each row's log-sum-exp; the backward
//! recomputes a block's probabilities from it (FlashAttention's schedule; at ViT's lengths
//! one block's scores against every key fit in cache, so no online softmax is needed). No
//! `[seq, seq]` matrix per head is kept for the backward pass, and only one block of scores
//! per thread exists at a time. The additive bias `[groups, seq, seq]` is shared by every
//! `groups`-th problem (Swin's relative-position bias and shift mask per window and head; a
//! ViT passes one zero matrix). Work is split over problems; within one the blocks run in
//! order, and the bias's gradient sums the problems in order, so every gradient is the same
//! on any number of threads.

use rayon::prelude::*;

use crate::cpu::{MatRef, exp_approx, matmul};

/// Query rows per block.
const BLOCK: usize = 64;

/// One call's shapes: `heads` independent problems (batch times heads), each of `seq`
/// tokens of width `dim`, with queries, keys, values and outputs `[heads, seq, dim]`
/// row-major.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub seq: usize,
    pub dim: usize,
    /// What the scores are multiplied by (`1 / sqrt(dim)`).
    pub scale: f32,
    /// Bias matrices; problem `h` adds matrix `h % groups`.
    pub groups: usize,
}

impl AttentionShape {
    fn per_head(&self) -> usize {
        self.seq * self.dim
    }

    /// The row ranges of the query blocks.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        let seq = self.seq;
        (0..seq)
            .step_by(BLOCK)
            .map(move |start| (start, BLOCK.min(seq - start)))
    }

    /// The rows `start..start + rows` of problem `h`'s bias matrix.
    fn bias_rows<'a>(&self, bias: &'a [f32], h: usize, start: usize, rows: usize) -> &'a [f32] {
        let matrix = h % self.groups * self.seq * self.seq;
        &bias[matrix + start * self.seq..][..rows * self.seq]
    }
}

/// The attention output and each row's log-sum-exp of its scores `[heads, seq]`.
pub fn attention_forward(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let per = s.per_head();
    let mut out = vec![0f32; s.heads * per];
    let mut lse = vec![0f32; s.heads * s.seq];
    out.par_chunks_mut(per)
        .zip(lse.par_chunks_mut(s.seq))
        .enumerate()
        .for_each_init(Vec::new, |scores, (h, (out, lse))| {
            let at = |t| part(t, h * per, per);
            let (q, k, v) = (at(q), at(k), at(v));
            for (start, rows) in s.blocks() {
                scores.resize(rows * s.seq, 0.0);
                let q = part(q, start * s.dim, rows * s.dim);
                scores_of(s, q, k, s.bias_rows(bias, h, start, rows), scores);
                for (row, lse) in scores.chunks_mut(s.seq).zip(&mut lse[start..][..rows]) {
                    *lse = softmax_row(row);
                }
                let out = &mut out[start * s.dim..][..rows * s.dim];
                let (p, v) = (MatRef::rows(scores, s.seq), MatRef::rows(v, s.dim));
                matmul(out, p, v, (rows, s.dim, s.seq), false);
            }
        });
    (out, lse)
}

/// What [`attention_backward`] reads: the forward's operands and output, its log-sum-exp,
/// and the output's gradient.
pub struct AttentionSaved<'a> {
    pub q: &'a [f32],
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub bias: &'a [f32],
    pub out: &'a [f32],
    pub lse: &'a [f32],
    pub grad: &'a [f32],
}

/// The gradients of the queries, keys and values, and of the bias when asked for.
pub struct AttentionGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub dbias: Option<Vec<f32>>,
}

/// The gradients from the output's, recomputing each block's probabilities from the
/// forward's log-sum-exp; the bias's (each problem's score gradient, summed over the
/// problems that share a matrix) only `with_bias_grad`.
pub fn attention_backward(
    s: AttentionShape,
    t: &AttentionSaved,
    with_bias_grad: bool,
) -> AttentionGrads {
    let per = s.per_head();
    let square = s.seq * s.seq;
    let mut dq = vec![0f32; t.q.len()];
    let mut dk = vec![0f32; t.k.len()];
    let mut dv = vec![0f32; t.v.len()];
    let mut dscores = vec![0f32; if with_bias_grad { s.heads * square } else { 0 }];
    let mut dscores_of: Vec<Option<&mut [f32]>> = dscores.chunks_mut(square).map(Some).collect();
    dscores_of.resize_with(s.heads, || None);
    dq.par_chunks_mut(per)
        .zip(dk.par_chunks_mut(per))
        .zip(dv.par_chunks_mut(per))
        .zip(dscores_of.par_iter_mut())
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, dp), (h, (((dq, dk), dv), dscores))| {
                let at = |x| part(x, h * per, per);
                let (q, k, v, out, grad) = (at(t.q), at(t.k), at(t.v), at(t.out), at(t.grad));
                let lse = &t.lse[h * s.seq..][..s.seq];
                for (start, rows) in s.blocks() {
                    p.resize(rows * s.seq, 0.0);
                    dp.resize(rows * s.seq, 0.0);
                    let block = |x| part(x, start * s.dim, rows * s.dim);
                    let (q, out, dy) = (block(q), block(out), block(grad));
                    scores_of(s, q, k, s.bias_rows(t.bias, h, start, rows), p);
                    for (row, &lse) in p.chunks_mut(s.seq).zip(&lse[start..][..rows]) {
                        exp_minus(row, lse);
                    }
                    // dV += P^T dY; dP = dY V^T.
                    let dy_rows = MatRef::rows(dy, s.dim);
                    let p_t = MatRef::transposed(p, s.seq);
                    matmul(dv, p_t, dy_rows, (s.seq, s.dim, rows), true);
                    let v_t = MatRef::transposed(v, s.dim);
                    matmul(dp, dy_rows, v_t, (rows, s.seq, s.dim), false);
                    // The scores' gradient P * (dP - rowsum(dY * Y)), written over dP: the
                    // bias's as it is, the product's times the scale.
                    for ((dp, p), (dy, y)) in dp
                        .chunks_mut(s.seq)
                        .zip(p.chunks(s.seq))
                        .zip(dy.chunks(s.dim).zip(out.chunks(s.dim)))
                    {
                        softmax_grad_row(dp, p, dot(dy, y));
                    }
                    if let Some(dscores) = dscores {
                        dscores[start * s.seq..][..rows * s.seq].copy_from_slice(dp);
                    }
                    scale_in_place(dp, s.scale);
                    // dQ = dS K; dK += dS^T Q.
                    let ds = MatRef::rows(dp, s.seq);
                    let dq = &mut dq[start * s.dim..][..rows * s.dim];
                    matmul(dq, ds, MatRef::rows(k, s.dim), (rows, s.dim, s.seq), false);
                    let ds_t = MatRef::transposed(dp, s.seq);
                    matmul(dk, ds_t, MatRef::rows(q, s.dim), (s.seq, s.dim, rows), true);
                }
            },
        );
    let dbias = with_bias_grad.then(|| sum_groups(s, &dscores));
    AttentionGrads { dq, dk, dv, dbias }
}

/// Per bias matrix, the sum of the score gradients of the problems that share it, in
/// problem order.
fn sum_groups(s: AttentionShape, dscores: &[f32]) -> Vec<f32> {
    let square = s.seq * s.seq;
    let mut dbias = vec![0f32; s.groups * square];
    dbias
        .par_chunks_mut(square)
        .enumerate()
        .for_each(|(g, out)| {
            for problem in dscores.chunks(square).skip(g).step_by(s.groups) {
                out.iter_mut().zip(problem).for_each(|(d, v)| *d += v);
            }
        });
    dbias
}

/// `len` values of `t` from `start`.
fn part(t: &[f32], start: usize, len: usize) -> &[f32] {
    &t[start..][..len]
}

/// `scores[rows, seq] = q[rows, dim] k^T * scale + bias[rows, seq]`.
fn scores_of(s: AttentionShape, q: &[f32], k: &[f32], bias: &[f32], scores: &mut [f32]) {
    let rows = q.len() / s.dim;
    let (q, k_t) = (MatRef::rows(q, s.dim), MatRef::transposed(k, s.dim));
    matmul(scores, q, k_t, (rows, s.seq, s.dim), false);
    scale_add(scores, s.scale, bias);
}

/// `x = x * scale + bias`.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn scale_add(x: &mut [f32], scale: f32, bias: &[f32]) {
    for (v, &b) in x.iter_mut().zip(bias) {
        *v = *v * scale + b;
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn scale_in_place(x: &mut [f32], scale: f32) {
    for v in x {
        *v *= scale;
    }
}

/// Softmax of one row in place; returns its log-sum-exp.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn softmax_row(row: &mut [f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for v in row.iter_mut() {
        *v = exp_approx(*v - max);
    }
    let sum: f32 = row.iter().sum();
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
    max + sum.ln()
}

/// `exp(x - lse)` in place: a row's probabilities again from its log-sum-exp.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn exp_minus(row: &mut [f32], lse: f32) {
    for v in row {
        *v = exp_approx(*v - lse);
    }
}

/// `dp = p * (dp - centre)` on one row.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn softmax_grad_row(dp: &mut [f32], p: &[f32], centre: f32) {
    for (d, &p) in dp.iter_mut().zip(p) {
        *d = p * (*d - centre);
    }
}
