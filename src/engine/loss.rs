//! The guidance loss: spherical distance between cutout embeddings and each prompt's target,
//! weighted, with an optional stop (`generate.py`'s `Prompt.forward`).

use candle_core::{D, Result, Tensor};

use super::ops::{asin, gradient_above};

/// What one prompt pulls the image towards (or, with a negative weight, pushes it from).
#[derive(Debug, Clone)]
pub struct PromptTarget {
    /// Target embeddings `[m, d]`: one row for a text or noise prompt, one per cutout for an
    /// image prompt. Not normalised.
    pub embed: Tensor,
    /// Weight; negative pushes away.
    pub weight: f64,
    /// Once `sign(weight)·distance` falls below this, that pair stops contributing gradient.
    pub stop: Option<f64>,
}

/// `2·asin(‖â − t̂‖ / 2)²` between every row of `a` `[n, d]` and of `t` `[m, d]`, after L2
/// normalisation (divided by `max(‖·‖, 1e-12)`): `[n, m]`, half the squared angle.
pub(crate) fn spherical_distance(a: &Tensor, t: &Tensor) -> Result<Tensor> {
    let unit = |x: &Tensor| -> Result<Tensor> {
        let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
        x.broadcast_div(&norm)
    };
    let a = unit(a)?.unsqueeze(1)?; // [n, 1, d]
    let t = unit(t)?.unsqueeze(0)?; // [1, m, d]
    let chord = a.broadcast_sub(&t)?.sqr()?.sum(D::Minus1)?.sqrt()?; // [n, m]
    asin(&(chord / 2.0)?)?.sqr()? * 2.0
}

/// One prompt's share of the loss from a chunk of cutout embeddings `[n, d]`:
/// `|w| · Σ sign(w)·d / (cutn · m)`, where `cutn` is the number of cutouts in the whole step
/// (so the shares of all chunks add up to the mean over every cutout). Also returns the
/// distances `[n, m]`.
pub fn prompt_loss(
    embeds: &Tensor,
    prompt: &PromptTarget,
    cutn: usize,
) -> Result<(Tensor, Tensor)> {
    let dists = spherical_distance(embeds, &prompt.embed)?;
    let sign = if prompt.weight < 0.0 { -1.0 } else { 1.0 };
    let mut signed = (&dists * sign)?;
    if let Some(stop) = prompt.stop {
        signed = gradient_above(&signed, stop)?;
    }
    let pairs = (cutn * prompt.embed.dim(0)?) as f64;
    let loss = (signed.sum_all()? * (prompt.weight.abs() / pairs))?;
    Ok((loss, dists))
}
