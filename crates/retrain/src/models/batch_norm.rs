//! BatchNorm as PyTorch computes it. burn's `BatchNorm` updates the running variance with the
//! biased batch variance; PyTorch uses the unbiased one, so fine-tuned statistics would drift
//! apart. This module is burn's, field for field (so burn-store's PyTorch adapters, which match
//! the type name `BatchNorm`, still map `weight`/`bias` to `gamma`/`beta`), with that update fixed.

use crate::kernels::{batch_norm_eval, batch_norm_train};
use burn::module::{Flag, Module, Param, RunningState};
use burn::nn::Initializer;
use burn::nn::conv::Conv2d;
use burn::prelude::*;

/// `torch.nn.BatchNorm2d` (and `1d`), with PyTorch's unbiased running-variance update.
#[derive(Module, Debug)]
pub struct BatchNorm {
    /// Scale per channel (PyTorch's `weight`).
    pub gamma: Param<Tensor<1>>,
    /// Shift per channel (PyTorch's `bias`).
    pub beta: Param<Tensor<1>>,
    /// Off for eval and for frozen layers: normalise with the running statistics.
    pub training: Param<Flag>,
    /// Running mean per channel, used in eval.
    pub running_mean: RunningState<Tensor<1>>,
    /// Running unbiased variance per channel, used in eval.
    pub running_var: RunningState<Tensor<1>>,
    /// PyTorch's convention: new = (1 - momentum) * old + momentum * batch.
    pub momentum: f64,
    /// Added to the variance before the square root (PyTorch's `eps`).
    pub epsilon: f64,
    /// Folded into the convolution before it (eval only): the layer passes its input through.
    pub folded: bool,
}

impl BatchNorm {
    /// A layer over `channels` channels as PyTorch initialises it: scale 1, shift 0,
    /// running mean 0 and variance 1, in training mode.
    pub fn new(channels: usize, epsilon: f64, momentum: f64, device: &Device) -> Self {
        Self {
            gamma: Initializer::Ones.init([channels], device),
            beta: Initializer::Zeros.init([channels], device),
            training: Param::from_bool(true),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            momentum,
            epsilon,
            folded: false,
        }
    }

    /// Fold this layer into `conv`, the convolution that feeds it, for inference: the conv
    /// weights are scaled by gamma / sqrt(var + eps), a bias takes beta - mean * scale, and
    /// this layer becomes the identity. One pass over the activations fewer per layer.
    pub fn fold_into(&mut self, conv: &mut Conv2d) {
        let var = self.running_var.value();
        let scale = self.gamma.val().div(var.add_scalar(self.epsilon).sqrt());
        let [cout, _, _, _] = conv.weight.dims();
        let weight = conv
            .weight
            .val()
            .mul(scale.clone().reshape([cout, 1, 1, 1]));
        let shift = self
            .beta
            .val()
            .sub(self.running_mean.value().mul(scale.clone()));
        let bias = match &conv.bias {
            Some(b) => b.val().mul(scale).add(shift),
            None => shift,
        };
        conv.weight = Param::from_tensor(weight);
        conv.bias = Some(Param::from_tensor(bias));
        self.folded = true;
    }

    /// Normalise `input` (`[N, C, ...]`): with the batch statistics, updating the running
    /// ones, when training on an autodiff device; with the running ones otherwise; not at
    /// all once folded.
    pub fn forward<const D: usize>(&self, input: Tensor<D>) -> Tensor<D> {
        if self.folded {
            return input;
        }
        let device = input.device();
        if !(device.is_autodiff() && self.training.is_enabled()) {
            let mean = self.running_mean.value().to_device(&device);
            let var = self.running_var.value().to_device(&device);
            return batch_norm_eval(
                input,
                self.gamma.val(),
                self.beta.val(),
                mean,
                var,
                self.epsilon,
            );
        }
        let dims = input.dims();
        let per_channel: usize = dims.iter().product::<usize>() / dims[1];
        let (output, batch_mean, batch_var) =
            batch_norm_train(input, self.gamma.val(), self.beta.val(), self.epsilon);
        let unbiased = if per_channel > 1 {
            per_channel as f64 / (per_channel - 1) as f64
        } else {
            1.0
        };
        let m = self.momentum;
        let mean = self.running_mean.value_sync().to_device(&device);
        let var = self.running_var.value_sync().to_device(&device);
        let mean = mean
            .mul_scalar(1.0 - m)
            .add(batch_mean.detach().mul_scalar(m));
        let var = var
            .mul_scalar(1.0 - m)
            .add(batch_var.detach().mul_scalar(m * unbiased));
        self.running_mean.update(mean.detach());
        self.running_var.update(var.detach());
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch: BatchNorm1d(1, momentum=1) on [[2], [6]] gives running_var 8 (unbiased).
    #[test]
    fn running_variance_is_unbiased_like_pytorch() {
        let device = Device::flex().autodiff();
        let bn = BatchNorm::new(1, 1e-5, 1.0, &device);
        let out = bn.forward(Tensor::<2>::from_floats([[2.0], [6.0]], &device));
        let bn = bn.valid();
        let var: Vec<f32> = bn.running_var.value().try_into_vec_as::<f32>().unwrap();
        let mean: Vec<f32> = bn.running_mean.value().try_into_vec_as::<f32>().unwrap();
        assert_eq!((mean[0], var[0]), (4.0, 8.0));
        // The output is normalised with the biased variance, as in PyTorch.
        let y: Vec<f32> = out.inner().try_into_vec_as::<f32>().unwrap();
        assert!(
            (y[0] + 1.0).abs() < 1e-4 && (y[1] - 1.0).abs() < 1e-4,
            "{y:?}"
        );
    }
}
