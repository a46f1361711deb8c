//! Functions whose output a few bytes of query can make huge (`repeat('x', 1e9)`, `lpad('', 1e9)`):
//! wrapped so that they refuse, before allocating, an output larger than the query's memory. The
//! memory pool does not see a function's output, and the planner folds constant calls while it plans,
//! where no deadline runs yet: without this, one such call held a core (and gigabytes) for minutes.

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type};
use datafusion::common::{DataFusionError, Result, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
};
use datafusion::execution::FunctionRegistry;
use datafusion::prelude::SessionContext;

/// The wrapped functions, by how their output size follows from their arguments.
const BOUNDED: [(&str, Growth); 3] = [("repeat", Growth::Repeat), ("lpad", Growth::Pad), ("rpad", Growth::Pad)];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: len(text) × n bytes.
    Repeat,
    /// `lpad/rpad(text, length [, fill])`: `length` characters of at most the fill's width.
    Pad,
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: ScalarUDF,
    growth: Growth,
    max_bytes: usize,
}

/// Most bytes one call may produce, whatever the query memory: the planner folds a constant call
/// into a literal that it copies from pass to pass (a 600 MB `repeat` took 45 s to plan in a debug
/// build), and no text of the news tables comes near it.
pub const MAX_CALL_BYTES: usize = 64 << 20;

/// Replaces the bounded functions of `ctx` with wrappers that refuse outputs over `memory_bytes`
/// (the query's memory) or [`MAX_CALL_BYTES`], whichever is less.
pub fn register(ctx: &SessionContext, memory_bytes: usize) {
    let max_bytes = memory_bytes.min(MAX_CALL_BYTES);
    for (name, growth) in BOUNDED {
        if let Ok(inner) = ctx.udf(name) {
            ctx.register_udf(ScalarUDF::new_from_impl(Bounded { inner: inner.as_ref().clone(), growth, max_bytes }));
        }
    }
}

/// Row `row` of a text argument (a scalar is every row); `None` for a null or a non-text value.
fn text(arg: &ColumnarValue, row: usize) -> Option<&str> {
    match arg {
        ColumnarValue::Scalar(ScalarValue::Utf8(Some(t)) | ScalarValue::Utf8View(Some(t)) | ScalarValue::LargeUtf8(Some(t))) => Some(t),
        ColumnarValue::Scalar(_) => None,
        ColumnarValue::Array(a) if a.is_null(row) => None,
        ColumnarValue::Array(a) => match a.data_type() {
            DataType::Utf8 => Some(a.as_string::<i32>().value(row)),
            DataType::LargeUtf8 => Some(a.as_string::<i64>().value(row)),
            DataType::Utf8View => Some(a.as_string_view().value(row)),
            _ => None,
        },
    }
}

fn count(arg: &ColumnarValue, row: usize) -> u128 {
    let value = match arg {
        ColumnarValue::Scalar(ScalarValue::Int64(Some(n))) => *n,
        ColumnarValue::Scalar(_) => 0,
        ColumnarValue::Array(a) if a.data_type() == &DataType::Int64 && !a.is_null(row) => a.as_primitive::<Int64Type>().value(row),
        ColumnarValue::Array(_) => 0,
    };
    value.max(0) as u128
}

/// The widest character of the fill (a space when there is none; 4 bytes for a fill of another type).
fn fill_width(args: &[ColumnarValue], row: usize) -> u128 {
    let Some(fill) = args.get(2) else { return 1 };
    let width = match text(fill, row) {
        Some(t) => t.chars().map(char::len_utf8).max().unwrap_or(1),
        None if matches!(fill, ColumnarValue::Array(a) if !a.is_null(row)) => 4,
        None => 1,
    };
    width as u128
}

impl Bounded {
    /// The most bytes this call can produce over all its rows.
    fn output_bytes(&self, args: &ScalarFunctionArgs) -> u128 {
        let rows = if args.args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_))) { 1 } else { args.number_rows };
        (0..rows)
            .map(|row| match self.growth {
                Growth::Repeat => text(&args.args[0], row).map_or(0, str::len) as u128 * count(&args.args[1], row),
                Growth::Pad => count(&args.args[1], row) * fill_width(&args.args, row),
            })
            .sum()
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let bytes = self.output_bytes(&args);
        if bytes > self.max_bytes as u128 {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{}() would produce {bytes} bytes, more than the {} MiB one call may produce",
                self.name(),
                self.max_bytes >> 20
            )));
        }
        self.inner.invoke_with_args(args)
    }
}
