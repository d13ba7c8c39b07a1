//! Rows of features with class labels or numeric targets, and a dataset's
//! train and test splits: what every data source (`data`, `synthetic`)
//! produces and every trainer consumes.

/// Rows of features with class labels, numeric targets, or both (a column
/// of whole numbers serves classification and regression alike; the job's
/// loss decides).
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// Row-major features, `len() == rows * features`.
    pub x: Vec<f32>,
    /// Class labels, `0..classes`; empty when the targets are not class numbers.
    pub y: Vec<i64>,
    /// Numeric targets, `target_width` per row (regression, multi-label); empty
    /// when the source has class labels only (losses other than
    /// cross-entropy then take the labels as numbers).
    pub targets: Vec<f32>,
    /// Targets per row (0 without numeric targets).
    pub target_width: usize,
    /// Features per row.
    pub features: usize,
    /// The shape of one example when the source has one (`[1, 8, 8]` from a
    /// `.npz` of images); empty: a flat row. Its product is `features`.
    pub shape: Vec<usize>,
}

impl Split {
    /// Rows of class labels.
    pub fn classes(x: Vec<f32>, y: Vec<i64>, features: usize) -> Self {
        Self { x, y, targets: Vec::new(), target_width: 0, features, shape: Vec::new() }
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        if !self.y.is_empty() || self.target_width == 0 { self.y.len() } else { self.targets.len() / self.target_width }
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn select(&self, rows: &[usize]) -> Self {
        let f = self.features;
        Self {
            x: rows.iter().flat_map(|&r| self.x[r * f..(r + 1) * f].iter().copied()).collect(),
            y: if self.y.is_empty() { Vec::new() } else { rows.iter().map(|&r| self.y[r]).collect() },
            targets: rows.iter().flat_map(|&r| self.targets[r * self.target_width..(r + 1) * self.target_width].iter().copied()).collect(),
            target_width: self.target_width,
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
