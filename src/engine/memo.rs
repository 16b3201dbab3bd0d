//! [`Memo`]: what a step makes once and each chunk of its cutouts reuses.

use std::cell::OnceCell;

use candle_core::Result;

/// A value made at its first use and kept while it is asked for with the same key; asked with
/// another key, it is made afresh and not kept. What a step makes once and every chunk of its
/// cutouts reuses: the pooled image, resize matrices, noise — so that on a GPU each is built
/// and uploaded once per step (or per run), not once per chunk.
#[derive(Debug, Clone)]
pub(crate) struct Memo<K, V>(OnceCell<(K, V)>);

impl<K, V> Default for Memo<K, V> {
    fn default() -> Self {
        Self(OnceCell::new())
    }
}

impl<K: PartialEq, V: Clone> Memo<K, V> {
    /// The value for `key`, made by `make` unless kept.
    pub(crate) fn get_or_make(&self, key: K, make: impl FnOnce() -> Result<V>) -> Result<V> {
        match self.0.get() {
            Some((k, v)) if *k == key => Ok(v.clone()),
            Some(_) => make(),
            None => {
                let v = make()?;
                let _ = self.0.set((key, v.clone()));
                Ok(v)
            }
        }
    }
}
