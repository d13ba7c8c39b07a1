//! Rows of features with class labels, and a dataset's train and test
//! splits: what every data source (`data`, `synthetic`) produces and every
//! trainer consumes.

/// Rows of features with class labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Row-major features, `len() == rows * features`.
    pub x: Vec<f32>,
    /// Labels, `0..classes`.
    pub y: Vec<i64>,
    /// Features per row.
    pub features: usize,
    /// The shape of one example when the source has one (`[1, 8, 8]` from a
    /// `.npz` of images); empty: a flat row. Its product is `features`.
    pub shape: Vec<usize>,
}

impl Split {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    pub(crate) fn select(&self, rows: &[usize]) -> Self {
        let f = self.features;
        Self {
            x: rows.iter().flat_map(|&r| self.x[r * f..(r + 1) * f].iter().copied()).collect(),
            y: rows.iter().map(|&r| self.y[r]).collect(),
            features: f,
            shape: self.shape.clone(),
        }
    }
}

/// A dataset's train and test splits.
#[derive(Clone, Debug, PartialEq)]
pub struct Data {
    /// What this worker trains on.
    pub train: Split,
    /// Held-out rows for evaluation.
    pub test: Split,
    /// Number of classes.
    pub classes: usize,
}
