//! Parquet tables as named numeric columns, read with the `parquet` crate's
//! Arrow reader: every integer, unsigned, float and boolean column; other
//! columns (strings, dates, nested) are named in the error.

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatchReader};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// Every column of a Parquet file, by name, as f64 (a null is NaN, refused later with its row).
pub fn parquet_columns(bytes: &[u8]) -> Result<Vec<(String, Vec<f64>)>, String> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::copy_from_slice(bytes))
        .map_err(|e| format!("not a Parquet file: {e}"))?
        .build()
        .map_err(|e| format!("cannot read the Parquet file: {e}"))?;
    let schema = reader.schema();
    let mut columns: Vec<(String, Vec<f64>)> = schema.fields().iter().map(|f| (f.name().clone(), Vec::new())).collect();
    for batch in reader {
        let batch = batch.map_err(|e| format!("cannot read the Parquet file: {e}"))?;
        for (i, (name, out)) in columns.iter_mut().enumerate() {
            append(batch.column(i), out)
                .map_err(|t| format!("column '{name}' is {t}; only numeric and boolean columns are read (encode categories as numbers)"))?;
        }
    }
    Ok(columns)
}

fn append(a: &ArrayRef, out: &mut Vec<f64>) -> Result<(), DataType> {
    macro_rules! values {
        ($t:ty) => {{
            let p = a.as_primitive::<$t>();
            out.extend((0..p.len()).map(|i| if p.is_null(i) { f64::NAN } else { p.value(i) as f64 }));
        }};
    }
    match a.data_type() {
        DataType::Float32 => values!(Float32Type),
        DataType::Float64 => values!(Float64Type),
        DataType::Int8 => values!(Int8Type),
        DataType::Int16 => values!(Int16Type),
        DataType::Int32 => values!(Int32Type),
        DataType::Int64 => values!(Int64Type),
        DataType::UInt8 => values!(UInt8Type),
        DataType::UInt16 => values!(UInt16Type),
        DataType::UInt32 => values!(UInt32Type),
        DataType::UInt64 => values!(UInt64Type),
        DataType::Boolean => {
            let b = a.as_boolean();
            out.extend((0..b.len()).map(|i| if b.is_null(i) { f64::NAN } else { f64::from(u8::from(b.value(i))) }));
        }
        other => return Err(other.clone()),
    }
    Ok(())
}
