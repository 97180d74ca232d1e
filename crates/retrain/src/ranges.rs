//! The ranges of numeric options. Each check is used twice: as a clap value parser, so a
//! bad value on the command line exits 2 naming its flag before anything runs, and by
//! [`crate::train::TrainOptions::validate`] for options a library caller builds by hand.

use std::ops::RangeInclusive;
use std::str::FromStr;

/// Input sides from 16 pixels (below that the networks' strided stages run out of pixels)
/// to 2048 (a batch of those already needs gigabytes).
pub const IMAGE_SIZES: RangeInclusive<usize> = 16..=2048;

/// Width multipliers up to 4 (a ResNet-50 at width 4 has 16 times the parameters).
pub const MAX_WIDTH: f64 = 4.0;

/// A value outside its range, said in words.
pub type Check<T> = fn(T) -> Result<T, String>;

fn parse<T: FromStr>(text: &str, check: Check<T>) -> Result<T, String> {
    let value = text
        .trim()
        .parse::<T>()
        .map_err(|_| format!("'{text}' is not a number"))?;
    check(value)
}

/// Finite and above 0 (learning rate, step decay, head LR multiplier).
pub fn check_positive(x: f64) -> Result<f64, String> {
    if x.is_finite() && x > 0.0 {
        Ok(x)
    } else {
        Err(format!("{x} must be a finite number above 0"))
    }
}

/// Finite and 0 or above (weight decay).
pub fn check_non_negative(x: f64) -> Result<f64, String> {
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("{x} must be a finite number, 0 or above"))
    }
}

/// `[0, 1)`: fractions that may be zero but not everything (val fraction, momentum).
pub fn check_fraction(x: f64) -> Result<f64, String> {
    if (0.0..1.0).contains(&x) {
        Ok(x)
    } else {
        Err(format!("{x} must be in [0, 1)"))
    }
}

/// `(0, 1]`: fractions that may be everything but not zero (crop scale).
pub fn check_share(x: f64) -> Result<f64, String> {
    if x > 0.0 && x <= 1.0 {
        Ok(x)
    } else {
        Err(format!("{x} must be in (0, 1]"))
    }
}

/// A count of 1 or more (epochs, step size).
pub fn check_at_least_one(n: usize) -> Result<usize, String> {
    if n >= 1 {
        Ok(n)
    } else {
        Err("must be at least 1".into())
    }
}

/// A count within `range`.
pub fn check_within(n: usize, range: RangeInclusive<usize>) -> Result<usize, String> {
    if range.contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{n} is outside {}..={}",
            range.start(),
            range.end()
        ))
    }
}

/// [`check_within`] on text, for a clap value parser of a count.
pub fn count_within(text: &str, range: RangeInclusive<usize>) -> Result<usize, String> {
    let n = text
        .trim()
        .parse::<usize>()
        .map_err(|_| format!("'{text}' is not a whole number"))?;
    check_within(n, range)
}

/// A square input side within [`IMAGE_SIZES`].
pub fn check_image_size(n: usize) -> Result<usize, String> {
    check_within(n, IMAGE_SIZES)
}

/// A width multiplier above 0 and at most [`MAX_WIDTH`].
pub fn check_width(x: f64) -> Result<f64, String> {
    if x.is_finite() && x > 0.0 && x <= MAX_WIDTH {
        Ok(x)
    } else {
        Err(format!("{x} must be above 0 and at most {MAX_WIDTH}"))
    }
}

/// [`check_positive`] on text.
pub fn positive(text: &str) -> Result<f64, String> {
    parse(text, check_positive)
}

/// [`check_non_negative`] on text.
pub fn non_negative(text: &str) -> Result<f64, String> {
    parse(text, check_non_negative)
}

/// [`check_fraction`] on text.
pub fn fraction(text: &str) -> Result<f64, String> {
    parse(text, check_fraction)
}

/// [`check_share`] on text.
pub fn share(text: &str) -> Result<f64, String> {
    parse(text, check_share)
}

/// Label smoothing, in `[0, 1)`.
pub fn smoothing(text: &str) -> Result<f32, String> {
    parse(text, check_fraction).map(|x| x as f32)
}

/// [`check_at_least_one`] on text.
pub fn at_least_one(text: &str) -> Result<usize, String> {
    parse(text, check_at_least_one)
}

/// [`check_image_size`] on text.
pub fn image_size(text: &str) -> Result<usize, String> {
    parse(text, check_image_size)
}

/// [`check_width`] on text.
pub fn width(text: &str) -> Result<f64, String> {
    parse(text, check_width)
}

/// Classes of a new head: 1 to a million.
pub fn num_classes(text: &str) -> Result<usize, String> {
    count_within(text, 1..=1_000_000)
}

/// Batches of 1 to 4096 images (the loader holds two ahead).
pub const BATCH_SIZES: RangeInclusive<usize> = 1..=4096;

/// A batch size within [`BATCH_SIZES`], from text.
pub fn batch_size(text: &str) -> Result<usize, String> {
    count_within(text, BATCH_SIZES)
}

/// Augmented views per image in the feature cache.
pub const CACHE_VIEWS: RangeInclusive<usize> = 1..=64;

/// A number of cached views within [`CACHE_VIEWS`], from text.
pub fn cache_views(text: &str) -> Result<usize, String> {
    count_within(text, CACHE_VIEWS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_refuse_what_the_options_cannot_mean() {
        assert!(positive("-1").is_err());
        assert!(positive("NaN").is_err());
        assert!(positive("inf").is_err());
        assert_eq!(positive("0.01"), Ok(0.01));
        assert!(fraction("1").is_err());
        assert_eq!(fraction("0"), Ok(0.0));
        assert!(share("0").is_err());
        assert!(share("2").is_err());
        assert!(share("NaN").is_err());
        assert_eq!(share("1"), Ok(1.0));
        assert!(smoothing("1.5").is_err());
        assert!(at_least_one("0").is_err());
        assert!(image_size("100000").is_err());
        assert!(image_size("0").is_err());
        assert_eq!(image_size("224"), Ok(224));
        assert!(width("0").is_err());
        assert!(width("64").is_err());
        assert!(batch_size("0").is_err());
        assert!(batch_size("100000").is_err());
        assert!(non_negative("-0.1").is_err());
        assert!(positive("abc").unwrap_err().contains("not a number"));
    }
}
