//! Scaled dot-product attention `softmax(q k^T * scale) v` in blocks of query rows, with a
//! hand-written backward. The forward keeps only each row's log-sum-exp; the backward
//! recomputes a block's probabilities from it (FlashAttention's schedule; at ViT's lengths
//! one block's scores against every key fit in cache, so no online softmax is needed). No
//! `[seq, seq]` matrix per head is kept for the backward pass, and only one block of scores
//! per thread exists at a time. Work is split over heads; within a head the blocks run in
//! order, so the key and value gradients are summed in the same order on any number of
//! threads.

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
}

/// The attention output and each row's log-sum-exp of its scaled scores `[heads, seq]`.
pub fn attention_forward(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let per = s.per_head();
    let mut out = vec![0f32; s.heads * per];
    let mut lse = vec![0f32; s.heads * s.seq];
    out.par_chunks_mut(per)
        .zip(lse.par_chunks_mut(s.seq))
        .enumerate()
        .for_each_init(Vec::new, |scores, (h, (out, lse))| {
            let (q, k, v) = (
                &q[h * per..][..per],
                &k[h * per..][..per],
                &v[h * per..][..per],
            );
            for (start, rows) in s.blocks() {
                scores.resize(rows * s.seq, 0.0);
                let q = &q[start * s.dim..][..rows * s.dim];
                scaled_scores(s, q, k, rows, scores);
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

/// The inputs' gradients `(dq, dk, dv)` from the output's, recomputing each block's
/// probabilities from the forward's log-sum-exp.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let per = s.per_head();
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    dq.par_chunks_mut(per)
        .zip(dk.par_chunks_mut(per))
        .zip(dv.par_chunks_mut(per))
        .enumerate()
        .for_each_init(
            || (Vec::new(), Vec::new()),
            |(p, dp), (h, ((dq, dk), dv))| {
                let at = |t| part(t, h * per, per);
                let (q, k, v, out, grad) = (at(q), at(k), at(v), at(out), at(grad));
                let lse = &lse[h * s.seq..][..s.seq];
                for (start, rows) in s.blocks() {
                    p.resize(rows * s.seq, 0.0);
                    dp.resize(rows * s.seq, 0.0);
                    let block = |t| part(t, start * s.dim, rows * s.dim);
                    let (q, out, dy) = (block(q), block(out), block(grad));
                    scaled_scores(s, q, k, rows, p);
                    for (row, &lse) in p.chunks_mut(s.seq).zip(&lse[start..][..rows]) {
                        exp_minus(row, lse);
                    }
                    // dV += P^T dY; dP = dY V^T.
                    let dy_rows = MatRef::rows(dy, s.dim);
                    let p_t = MatRef::transposed(p, s.seq);
                    matmul(dv, p_t, dy_rows, (s.seq, s.dim, rows), true);
                    let v_t = MatRef::transposed(v, s.dim);
                    matmul(dp, dy_rows, v_t, (rows, s.seq, s.dim), false);
                    // dS = P * (dP - rowsum(dY * Y)) * scale, written over dP.
                    for ((dp, p), (dy, y)) in dp
                        .chunks_mut(s.seq)
                        .zip(p.chunks(s.seq))
                        .zip(dy.chunks(s.dim).zip(out.chunks(s.dim)))
                    {
                        let centre = dot(dy, y);
                        softmax_grad_row(dp, p, centre, s.scale);
                    }
                    // dQ = dS K; dK += dS^T Q.
                    let ds = MatRef::rows(dp, s.seq);
                    let dq = &mut dq[start * s.dim..][..rows * s.dim];
                    matmul(dq, ds, MatRef::rows(k, s.dim), (rows, s.dim, s.seq), false);
                    let ds_t = MatRef::transposed(dp, s.seq);
                    matmul(dk, ds_t, MatRef::rows(q, s.dim), (s.seq, s.dim, rows), true);
                }
            },
        );
    (dq, dk, dv)
}

/// `len` values of `t` from `start`.
fn part(t: &[f32], start: usize, len: usize) -> &[f32] {
    &t[start..][..len]
}

/// `scores[rows, seq] = q[rows, dim] k^T * scale`.
fn scaled_scores(s: AttentionShape, q: &[f32], k: &[f32], rows: usize, scores: &mut [f32]) {
    let (q, k_t) = (MatRef::rows(q, s.dim), MatRef::transposed(k, s.dim));
    matmul(scores, q, k_t, (rows, s.seq, s.dim), false);
    scale_in_place(scores, s.scale);
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

/// `dp = p * (dp - centre) * scale` on one row.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn softmax_grad_row(dp: &mut [f32], p: &[f32], centre: f32, scale: f32) {
    for (d, &p) in dp.iter_mut().zip(p) {
        *d = p * (*d - centre) * scale;
    }
}
