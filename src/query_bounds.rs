//! A bound on what one DataFusion function call can allocate, for every SQL the process runs (the
//! tables' SQL, alert rules' `kind = "sql"` conditions). The memory pool sees operators' state (sorts,
//! joins, aggregates), not a function's output, and the planner folds constant calls while it plans,
//! where no deadline runs yet: a few bytes of query (`repeat('x', 1e9)`, `array_repeat(1, 2e9)`,
//! `range(1, 1e9)`, `replace(s, 'a', repeat('b', 1000))`, four nested `encode(…, 'hex')`) held a core
//! and gigabytes for minutes, or had the process killed for memory.
//!
//! Every scalar function of a session is wrapped, and so is the `||` operator on text (rewritten into
//! the same wrapper, see [`ConcatOperator`]). A call whose output is text, binary or nested:
//! - refuses before it runs when its estimated output exceeds the bound. Functions whose output a
//!   count or a pattern multiplies have their own estimate ([`Growth`]); any other is held to the size
//!   of its inputs, a scalar counting once per row, so `concat(s, s, …, s)` cannot multiply either;
//! - fails after it ran when its actual output exceeds the bound, so that a function that grows its
//!   input by a small factor (`encode(…, 'hex')` doubles) cannot be nested into an exponential.
//!
//! So no call allocates more than a small multiple of the bound. `levenshtein`, quadratic in time,
//! refuses pairs of texts whose product of lengths would hold a query thread for more than a second
//! or so (a kernel does not see the deadline until it returns). Regular expressions and `LIKE` /
//! `SIMILAR TO` patterns, which are compiled before they match, hold at most
//! [`MAX_PATTERN_BYTES`] (see [`PatternGuard`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type, IntervalUnit, Schema, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::Transformed;
use datafusion::common::{DFSchema, DataFusionError, ExprSchema, Result, ScalarValue};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::FunctionRewrite;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Documentation, Expr, ExprSchemable, Operator, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use crate::sync::lock;

/// Most bytes one call of constant arguments may produce, whatever the query memory: the planner
/// folds such a call into a literal that it copies from pass to pass (a 600 MB `repeat` took 45 s
/// to plan in a debug build), and no text of the news tables comes near it. A call over a batch of
/// rows may produce up to the query memory.
pub const MAX_CALL_BYTES: usize = 64 << 20;

/// Literals larger than this count toward [`NoBroadcast`]'s bound (an `IN` list's items stay below).
const BROADCAST_LITERAL_BYTES: u128 = 4096;

/// Most character pairs one `levenshtein` call may compare (about a second of a core).
const MAX_LEVENSHTEIN_PAIRS: u128 = 1 << 30;

/// Longest regular expression or `LIKE`/`SIMILAR TO` pattern, in bytes. Compiling one of megabytes
/// took 9 s and 1 GB before the regex crate's size limit refused it (parsing comes first); a
/// query's own text holds at most 64 KiB, so only a computed pattern (`repeat(…)`) comes near.
const MAX_PATTERN_BYTES: u128 = 64 << 10;

/// Fails when a row of `pattern` (a scalar: once) is longer than [`MAX_PATTERN_BYTES`]: a value
/// error, as a pattern that does not compile is.
fn check_pattern(pattern: &ColumnarValue, rows: usize) -> Result<()> {
    if columnar_bytes(pattern, 1) <= MAX_PATTERN_BYTES {
        return Ok(());
    }
    let rows = if matches!(pattern, ColumnarValue::Scalar(_)) { 1 } else { rows };
    match (0..rows).map(|row| text_len(Some(pattern), row)).max() {
        Some(longest) if longest > MAX_PATTERN_BYTES => Err(DataFusionError::Execution(format!(
            "a pattern or regular expression of {longest} bytes, more than the {MAX_PATTERN_BYTES} one may have"
        ))),
        _ => Ok(()),
    }
}

/// How a function's output size follows from its arguments, where not from their sizes alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(text, n)`: len(text) × n bytes.
    Repeat,
    /// `lpad/rpad(text, length [, fill])`: `length` characters of at most the fill's width.
    Pad,
    /// `array_repeat(element, n)`: n copies of the element.
    ArrayRepeat,
    /// `array_resize(array, size [, value])`: `size` elements of at most the value's size.
    ArrayResize,
    /// `range/generate_series([start,] stop [, step])`: (stop − start) ÷ step elements.
    Series,
    /// `replace(text, from, to)`: every `from` (or every gap, when empty) becomes `to`.
    Replace,
    /// `regexp_replace(text, pattern, replacement [, flags])`: every match (each position, with `g`)
    /// becomes the replacement, whose group references copy at most the whole text each.
    RegexpReplace,
    /// `array_to_string(array, delimiter [, null])`: a delimiter (and null text) per element of the
    /// innermost lists.
    ArrayToString,
    /// `array_replace[_n|_all](array, from, to)`: each element may become `to`.
    ArrayReplace,
    /// `concat_ws(separator, text…)`: a separator between every two.
    ConcatWs,
    /// `string_to_array(text, delimiter [, null])`: a piece per delimiter found (per character for a
    /// NULL delimiter), each with a 16-byte view.
    Split,
    /// `upper/lower/initcap(text)`: ASCII text keeps its size; Unicode case mappings grow a
    /// character up to threefold ('ΐ', 2 bytes, upper-cases to three characters of 6).
    Case,
    /// `translate(text, from, to)`: ASCII into ASCII keeps the size; else each character may become
    /// one of 4 bytes.
    Translate,
    /// Anything else: output within this factor of the inputs' bytes, the most the function can
    /// grow them (1 for most; a hex encoding or a date format more).
    Inputs(u8),
    /// `levenshtein(a, b)`: time ∝ len(a) × len(b).
    Quadratic,
}

impl Growth {
    fn of(name: &str) -> Growth {
        match name {
            "repeat" => Growth::Repeat,
            "lpad" | "rpad" => Growth::Pad,
            "array_repeat" => Growth::ArrayRepeat,
            "array_resize" => Growth::ArrayResize,
            "range" | "generate_series" => Growth::Series,
            "replace" => Growth::Replace,
            "regexp_replace" => Growth::RegexpReplace,
            "array_to_string" => Growth::ArrayToString,
            "array_replace" | "array_replace_n" | "array_replace_all" => Growth::ArrayReplace,
            "concat_ws" => Growth::ConcatWs,
            "levenshtein" => Growth::Quadratic,
            "string_to_array" => Growth::Split,
            // `%+` writes 25 characters for 2: a format's specifiers expand at most about 13-fold.
            "to_char" | "date_format" => Growth::Inputs(16),
            "translate" => Growth::Translate,
            "upper" | "lower" | "initcap" => Growth::Case,
            "encode" | "to_hex" => Growth::Inputs(2),
            _ => Growth::Inputs(1),
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: ScalarUDF,
    growth: Growth,
    memory_bytes: usize,
    /// The argument a `regexp_*` function compiles.
    pattern: Option<usize>,
}

/// Wraps every scalar function of `ctx`, and `||` on text, to refuse outputs over `memory_bytes`
/// (the query's memory), or over [`MAX_CALL_BYTES`] for a call of constant arguments.
pub fn register(ctx: &mut SessionContext, memory_bytes: usize) -> Result<()> {
    let mut functions: Vec<Arc<ScalarUDF>> = ctx.state().scalar_functions().values().cloned().collect();
    functions.sort_by(|a, b| a.name().cmp(b.name()));
    functions.dedup_by(|a, b| a.name() == b.name());
    for function in functions {
        SessionContext::register_udf(ctx, wrap(function.as_ref().clone(), memory_bytes));
    }
    ctx.register_function_rewrite(Arc::new(ConcatOperatorRewrite { memory_bytes }))?;
    ctx.register_function_rewrite(Arc::new(PatternRewrite))
}

/// What the running statement's constant calls have made, where a query runs in [`scope`].
#[derive(Default)]
struct Constants {
    bytes: AtomicU64,
    /// The first constant call refused. DataFusion's planner keeps a constant call whose evaluation
    /// failed, to fail at run time, and goes on planning with what it folded around it: tens of
    /// seconds of copying a folded 20 MB literal through every pass. The next function the planner
    /// simplifies fails the query with this instead.
    refused: std::sync::Mutex<Option<String>>,
}

tokio::task_local! {
    static CONSTANTS: Arc<Constants>;
}

/// Runs `statements` with one budget for the constants they make: the planner folds each constant
/// call into a literal that the plan keeps, so thirty `repeat('x', 60000000)` columns held 7 GB
/// while planning, each call within its own bound. [`next_statement`] starts a new one.
pub async fn scope<F: std::future::Future>(statements: F) -> F::Output {
    CONSTANTS.scope(Arc::default(), statements).await
}

/// A new statement of the running scope (a Postgres connection's next query) starts a new budget.
pub fn next_statement() {
    let _ = CONSTANTS.try_with(|made| {
        made.bytes.store(0, Ordering::Relaxed);
        *lock(&made.refused) = None;
    });
}

/// Notes a refused constant call for the planner's next simplification (see [`Constants`]).
fn refuse_constant(error: DataFusionError) -> DataFusionError {
    if let DataFusionError::ResourcesExhausted(reason) = &error {
        let _ = CONSTANTS.try_with(|made| {
            lock(&made.refused).get_or_insert_with(|| reason.clone());
        });
    }
    error
}

fn wrap(inner: ScalarUDF, memory_bytes: usize) -> ScalarUDF {
    let growth = Growth::of(inner.name());
    let pattern = inner.name().starts_with("regexp_").then_some(1);
    ScalarUDF::new_from_impl(Bounded { inner, growth, memory_bytes, pattern })
}

/// Types whose values vary in size: the only outputs that can grow.
fn variable_width(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::List(_)
            | DataType::LargeList(_)
            | DataType::ListView(_)
            | DataType::LargeListView(_)
            | DataType::FixedSizeList(..)
            | DataType::Struct(_)
            | DataType::Map(..)
            | DataType::Union(..)
            | DataType::Dictionary(..)
    )
}

/// Bytes an array's values take, as written out: text and binary by length, lists by the values
/// they reach (a slice counts only its own), fixed-width values by their width.
fn array_bytes(array: &dyn Array) -> u128 {
    let len = array.len();
    match array.data_type() {
        // The offsets from the array's own: the bytes between its first and last, and the offsets.
        DataType::Utf8 | DataType::Binary => {
            let data = array.to_data();
            let o = data.buffer::<i32>(0);
            (o[len] - o[0]).max(0) as u128 + 4 * len as u128
        }
        DataType::LargeUtf8 | DataType::LargeBinary => {
            let data = array.to_data();
            let o = data.buffer::<i64>(0);
            (o[len] - o[0]).max(0) as u128 + 8 * len as u128
        }
        DataType::Utf8View => array.as_string_view().views().iter().map(|v| *v as u32 as u128 + 16).sum(),
        DataType::BinaryView => array.as_binary_view().views().iter().map(|v| *v as u32 as u128 + 16).sum(),
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..) => {
            let offset_width = match array.data_type() {
                DataType::List(_) => 4,
                DataType::LargeList(_) => 8,
                _ => 0,
            };
            list_values(array).map_or(0, |values| array_bytes(values.as_ref())) + offset_width * len as u128
        }
        DataType::Struct(_) => array.as_struct().columns().iter().map(|c| array_bytes(c.as_ref())).sum(),
        DataType::Map(..) => {
            let map = array.as_map();
            let o = map.value_offsets();
            array_bytes(&map.entries().slice(o[0] as usize, (o[len] - o[0]).max(0) as usize)) + 4 * len as u128
        }
        other => match other.primitive_width() {
            Some(width) => (width * len) as u128,
            None => array.get_array_memory_size() as u128,
        },
    }
}

/// The values a list array's rows reach (a slice's own, not the whole child); `None` for another type.
fn list_values(array: &dyn Array) -> Option<ArrayRef> {
    let len = array.len();
    let slice = |values: &ArrayRef, first: i64, last: i64| values.slice(first as usize, (last - first).max(0) as usize);
    match array.data_type() {
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let o = list.value_offsets();
            Some(slice(list.values(), o[0] as i64, o[len] as i64))
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            let o = list.value_offsets();
            Some(slice(list.values(), o[0], o[len]))
        }
        DataType::FixedSizeList(_, n) => {
            let list = array.as_fixed_size_list();
            let n = (*n).max(0) as i64;
            Some(slice(list.values(), list.offset() as i64 * n, (list.offset() + len) as i64 * n))
        }
        _ => None,
    }
}

/// Bytes of a call's argument or output: an array's values, a scalar's once per row of `rows`.
fn columnar_bytes(value: &ColumnarValue, rows: usize) -> u128 {
    match value {
        ColumnarValue::Scalar(value) => scalar_bytes(value) * rows as u128,
        ColumnarValue::Array(array) => array_bytes(array.as_ref()),
    }
}

/// Whether every argument is a constant: the call the planner folds while it plans.
fn constant(args: &[ColumnarValue]) -> bool {
    args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)))
}

/// Rows a call produces: one for a call of constants, however many rows its batch has.
fn call_rows(args: &ScalarFunctionArgs) -> usize {
    if constant(&args.args) { 1 } else { args.number_rows }
}

/// `~`, `~*`, `!~` and `!~*`: the operators that compile their right operand into a regex.
fn regex_operator(op: &Operator) -> bool {
    matches!(op, Operator::RegexMatch | Operator::RegexIMatch | Operator::RegexNotMatch | Operator::RegexNotIMatch)
}

/// Row `row` of an argument as a one-row array (a scalar is every row).
fn row_array(arg: &ColumnarValue, row: usize) -> Option<ArrayRef> {
    match arg {
        ColumnarValue::Scalar(value) => value.to_array().ok(),
        ColumnarValue::Array(a) => Some(a.slice(row, 1)),
    }
}

/// Bytes of a scalar's value (text by length, a list by its values).
fn scalar_bytes(value: &ScalarValue) -> u128 {
    match value {
        ScalarValue::Utf8(s) | ScalarValue::LargeUtf8(s) | ScalarValue::Utf8View(s) => s.as_ref().map_or(0, |s| s.len() as u128),
        ScalarValue::Binary(b) | ScalarValue::LargeBinary(b) | ScalarValue::BinaryView(b) => b.as_ref().map_or(0, |b| b.len() as u128),
        ScalarValue::List(a) => array_bytes(a.as_ref()),
        ScalarValue::LargeList(a) => array_bytes(a.as_ref()),
        ScalarValue::FixedSizeList(a) => array_bytes(a.as_ref()),
        ScalarValue::Struct(a) => array_bytes(a.as_ref()),
        ScalarValue::Map(a) => array_bytes(a.as_ref()),
        other => other.data_type().primitive_width().map_or(other.size(), |w| w) as u128,
    }
}

/// Bytes of row `row` of an argument (a scalar is every row).
fn value_bytes(arg: &ColumnarValue, row: usize) -> u128 {
    match arg {
        ColumnarValue::Scalar(value) => scalar_bytes(value),
        ColumnarValue::Array(a) if a.is_null(row) => 0,
        ColumnarValue::Array(a) => array_bytes(a.slice(row, 1).as_ref()),
    }
}

/// Row `row` of a text argument; `None` for a null or a non-text value.
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

fn text_len(arg: Option<&ColumnarValue>, row: usize) -> u128 {
    arg.and_then(|a| text(a, row)).map_or(0, str::len) as u128
}

/// Row `row` of an integer argument, as i128 (`None` for a null or another type).
fn integer(arg: &ColumnarValue, row: usize) -> Option<i128> {
    match arg {
        ColumnarValue::Scalar(ScalarValue::Int64(n)) => n.map(i128::from),
        ColumnarValue::Scalar(ScalarValue::Int32(n)) => n.map(i128::from),
        ColumnarValue::Array(a) if a.is_null(row) => None,
        ColumnarValue::Array(a) if a.data_type() == &DataType::Int64 => Some(a.as_primitive::<Int64Type>().value(row) as i128),
        _ => None,
    }
}

fn count(arg: Option<&ColumnarValue>, row: usize) -> u128 {
    arg.and_then(|a| integer(a, row)).map_or(0, |n| n.max(0) as u128)
}

/// Elements of row `row` of a list argument: with `leaves`, those of the innermost lists (what
/// `array_to_string` joins, nested lists flattened), else the top level's.
fn list_len(arg: &ColumnarValue, row: usize, leaves: bool) -> u128 {
    row_array(arg, row).map_or(0, |array| elements(array.as_ref(), leaves))
}

fn elements(array: &dyn Array, leaves: bool) -> u128 {
    let Some(values) = list_values(array) else { return 0 };
    match leaves {
        true if matches!(values.data_type(), DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..)) => {
            elements(values.as_ref(), true)
        }
        _ => values.len() as u128,
    }
}

/// Row `row` of a date or timestamp argument in nanoseconds.
fn instant_ns(arg: &ColumnarValue, row: usize) -> Option<i128> {
    let array = row_array(arg, row)?;
    if array.is_null(0) {
        return None;
    }
    let (value, per_unit): (i128, i128) = match array.data_type() {
        DataType::Date32 => (array.as_primitive::<datafusion::arrow::datatypes::Date32Type>().value(0) as i128, 86_400_000_000_000),
        DataType::Date64 => (array.as_primitive::<datafusion::arrow::datatypes::Date64Type>().value(0) as i128, 1_000_000),
        DataType::Timestamp(unit, _) => {
            let raw = datafusion::arrow::compute::cast(&array, &DataType::Int64).ok()?;
            let per_unit = match unit {
                TimeUnit::Second => 1_000_000_000,
                TimeUnit::Millisecond => 1_000_000,
                TimeUnit::Microsecond => 1_000,
                TimeUnit::Nanosecond => 1,
            };
            (raw.as_primitive::<Int64Type>().value(0) as i128, per_unit)
        }
        _ => return None,
    };
    Some(value * per_unit)
}

/// The shortest an interval step can be, in nanoseconds (a month at least 28 days, a day 23 hours);
/// 1 when its parts point different ways.
fn step_ns(arg: &ColumnarValue, row: usize) -> Option<i128> {
    const DAY: i128 = 23 * 3_600_000_000_000;
    let array = row_array(arg, row)?;
    if array.is_null(0) {
        return None;
    }
    let parts: [i128; 3] = match array.data_type() {
        DataType::Interval(IntervalUnit::MonthDayNano) => {
            let v = array.as_primitive::<datafusion::arrow::datatypes::IntervalMonthDayNanoType>().value(0);
            [v.months as i128 * 28 * DAY, v.days as i128 * DAY, v.nanoseconds as i128]
        }
        DataType::Interval(IntervalUnit::DayTime) => {
            let v = array.as_primitive::<datafusion::arrow::datatypes::IntervalDayTimeType>().value(0);
            [v.days as i128 * DAY, v.milliseconds as i128 * 1_000_000, 0]
        }
        DataType::Interval(IntervalUnit::YearMonth) => {
            [array.as_primitive::<datafusion::arrow::datatypes::IntervalYearMonthType>().value(0) as i128 * 28 * DAY, 0, 0]
        }
        _ => return None,
    };
    let same_way = parts.iter().all(|p| *p >= 0) || parts.iter().all(|p| *p <= 0);
    Some(if same_way { parts.iter().map(|p| p.abs()).sum() } else { 1 })
}

/// Elements of `range/generate_series` for row `row` (0 where they cannot be made).
fn series_len(args: &[ColumnarValue], row: usize) -> u128 {
    let span_and_step = match args {
        [stop] => integer(stop, row).map(|stop| (stop, 1)),
        [start, stop, rest @ ..] => match (integer(start, row), integer(stop, row)) {
            (Some(start), Some(stop)) => {
                let step = rest.first().map_or(Some(1), |s| integer(s, row));
                step.map(|step| (stop - start, step))
            }
            _ => match (instant_ns(start, row), instant_ns(stop, row), rest.first().and_then(|s| step_ns(s, row))) {
                (Some(start), Some(stop), Some(step)) => Some((stop - start, step)),
                _ => None,
            },
        },
        [] => None,
    };
    match span_and_step {
        Some((_, 0)) | None => 0,
        Some((span, step)) => (span.unsigned_abs() / step.unsigned_abs()) + 1,
    }
}

impl Bounded {
    /// The most bytes this call can produce (for `levenshtein`, character pairs to compare).
    fn estimate(&self, args: &ScalarFunctionArgs) -> u128 {
        let a = &args.args;
        let rows = call_rows(args);
        let per_row = |row: usize| -> u128 {
            match self.growth {
                Growth::Repeat => text_len(a.first(), row) * count(a.get(1), row),
                Growth::Pad => count(a.get(1), row) * fill_width(a, row),
                Growth::ArrayRepeat => count(a.get(1), row) * (a.first().map_or(0, |e| value_bytes(e, row)) + 8),
                Growth::ArrayResize => {
                    let element = a.get(2).map_or(16, |v| value_bytes(v, row).max(16));
                    count(a.get(1), row) * (element + 8) + a.first().map_or(0, |l| value_bytes(l, row))
                }
                Growth::Series => series_len(a, row) * 16,
                Growth::Replace => {
                    let t = text_len(a.first(), row);
                    t + (t / text_len(a.get(1), row).max(1) + 1) * text_len(a.get(2), row)
                }
                Growth::RegexpReplace => {
                    let t = text_len(a.first(), row);
                    let replacement = a.get(2).and_then(|r| text(r, row)).unwrap_or("");
                    let global = a.get(3).and_then(|f| text(f, row)).is_some_and(|f| f.contains('g'));
                    let matches = if global { t + 1 } else { 1 };
                    let references = replacement.bytes().filter(|b| *b == b'$' || *b == b'\\').count() as u128;
                    t + matches * replacement.len() as u128 + references * t
                }
                Growth::ArrayToString => {
                    let per_element = 24 + text_len(a.get(1), row) + text_len(a.get(2), row);
                    a.first().map_or(0, |l| value_bytes(l, row) + list_len(l, row, true) * per_element)
                }
                Growth::ArrayReplace => {
                    a.first().map_or(0, |l| value_bytes(l, row) + list_len(l, row, false) * a.get(2).map_or(0, |t| value_bytes(t, row)))
                }
                Growth::ConcatWs => {
                    let separators = a.len().saturating_sub(2) as u128 * text_len(a.first(), row);
                    a.iter().skip(1).map(|v| value_bytes(v, row)).sum::<u128>() + separators
                }
                Growth::Split => {
                    let Some(whole) = a.first().and_then(|t| text(t, row)) else { return 8 };
                    let pieces = match a.get(1).map(|d| (d, text(d, row))) {
                        Some((_, Some(""))) => 1,
                        Some((_, Some(delimiter))) => whole.matches(delimiter).count() + 1,
                        // A NULL delimiter (a text one that is null in this row, or no text at all).
                        _ => whole.chars().count(),
                    };
                    whole.len() as u128 + 16 * pieces as u128 + 8
                }
                Growth::Case => {
                    let whole = a.first().and_then(|t| text(t, row)).unwrap_or("");
                    whole.len() as u128 * if whole.is_ascii() { 1 } else { 3 }
                }
                Growth::Translate => {
                    let whole = a.first().and_then(|t| text(t, row)).unwrap_or("");
                    let ascii = whole.is_ascii() && a.get(2).and_then(|t| text(t, row)).is_none_or(str::is_ascii);
                    whole.len() as u128 * if ascii { 1 } else { 4 }
                }
                Growth::Quadratic => text_len(a.first(), row) * text_len(a.get(1), row),
                Growth::Inputs(_) => unreachable!("estimated from the whole inputs"),
            }
        };
        match self.growth {
            Growth::Inputs(factor) => u128::from(factor) * a.iter().map(|arg| columnar_bytes(arg, rows)).sum::<u128>(),
            _ => (0..rows).map(per_row).sum(),
        }
    }

    /// A bound on [`Bounded::estimate`] from the inputs' sizes alone, for the growths that read
    /// every row's values to estimate: when it fits, the rows need not be read (reading them cost
    /// a text scan a third slower).
    fn ceiling(&self, args: &ScalarFunctionArgs) -> Option<u128> {
        let a = &args.args;
        let rows = call_rows(args);
        let text_bytes = || a.first().map_or(0, |t| columnar_bytes(t, rows));
        match self.growth {
            Growth::Case => Some(3 * text_bytes()),
            Growth::Translate => Some(4 * text_bytes()),
            // At most a piece per byte, and one more per row.
            Growth::Split => Some(17 * text_bytes() + 24 * rows as u128),
            _ => None,
        }
    }

    fn max_bytes(&self, args: &ScalarFunctionArgs) -> usize {
        if constant(&args.args) {
            self.memory_bytes.min(MAX_CALL_BYTES)
        } else {
            self.memory_bytes
        }
    }

    fn refusal(&self, bytes: u128, max_bytes: usize) -> DataFusionError {
        DataFusionError::ResourcesExhausted(format!(
            "{}() would produce {bytes} bytes, more than the {} MiB one call may produce",
            self.name(),
            max_bytes >> 20
        ))
    }
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

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn display_name(&self, args: &[Expr]) -> Result<String> {
        #[expect(deprecated)]
        self.inner.inner().display_name(args)
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
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

    fn is_nullable(&self, args: &[Expr], schema: &dyn ExprSchema) -> bool {
        #[expect(deprecated)]
        self.inner.inner().is_nullable(args, schema)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        self.inner.inner().with_updated_config(config).map(|updated| wrap(updated, self.memory_bytes))
    }

    /// `concat` and `concat_ws` join their literal arguments while planning, without a call:
    /// held to the bound of a constant call here. `regexp_like` simplifies into `~`, after the
    /// rewrites have run: its pattern is guarded here.
    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        let literal = |e: &Expr| match e {
            Expr::Literal(value, _) => scalar_bytes(value),
            _ => 0,
        };
        let mut bytes: u128 = args.iter().map(literal).sum();
        if self.growth == Growth::ConcatWs {
            bytes += args.len().saturating_sub(2) as u128 * args.first().map_or(0, literal);
        }
        let max_bytes = self.memory_bytes.min(MAX_CALL_BYTES);
        if bytes > max_bytes as u128 {
            return Err(self.refusal(bytes, max_bytes));
        }
        if let Some(reason) = CONSTANTS.try_with(|made| lock(&made.refused).clone()).ok().flatten() {
            return Err(DataFusionError::ResourcesExhausted(reason));
        }
        match self.inner.simplify(args, info)? {
            ExprSimplifyResult::Simplified(expr) if self.pattern.is_some() => {
                use datafusion::common::tree_node::TreeNode;
                Ok(ExprSimplifyResult::Simplified(expr.transform_up(guard_pattern)?.data))
            }
            other => Ok(other),
        }
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<datafusion::logical_expr::preimage::PreimageResult> {
        self.inner.inner().preimage(args, lit_expr, info)
    }

    fn conditional_arguments<'a>(&self, args: &'a [Expr]) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }

    fn short_circuits(&self) -> bool {
        self.inner.short_circuits()
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.evaluate_bounds(input)
    }

    fn propagate_constraints(&self, interval: &Interval, inputs: &[&Interval]) -> Result<Option<Vec<Interval>>> {
        self.inner.propagate_constraints(interval, inputs)
    }

    fn struct_field_mapping(&self, literal_args: &[Option<ScalarValue>]) -> Option<datafusion::logical_expr::StructFieldMapping> {
        self.inner.inner().struct_field_mapping(literal_args)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[datafusion::logical_expr::ExpressionPlacement]) -> datafusion::logical_expr::ExpressionPlacement {
        self.inner.inner().placement(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        if let Some(pattern) = self.pattern.and_then(|index| args.args.get(index)) {
            check_pattern(pattern, args.number_rows)?;
        }
        let max_bytes = self.max_bytes(&args);
        if self.growth == Growth::Quadratic {
            let pairs = self.estimate(&args);
            if pairs > MAX_LEVENSHTEIN_PAIRS {
                // Time, not memory: the query's values are too long for the function.
                return Err(DataFusionError::Execution(format!(
                    "{}() would compare {pairs} pairs of characters, more than the {MAX_LEVENSHTEIN_PAIRS} one call may",
                    self.name()
                )));
            }
            return self.inner.invoke_with_args(args);
        }
        if !variable_width(args.return_field.data_type()) {
            return self.inner.invoke_with_args(args);
        }
        let args_all_scalar = constant(&args.args);
        let refused = |error: DataFusionError| if args_all_scalar { refuse_constant(error) } else { error };
        if self.ceiling(&args).is_none_or(|ceiling| ceiling > max_bytes as u128) {
            let estimate = self.estimate(&args);
            if estimate > max_bytes as u128 {
                return Err(refused(self.refusal(estimate, max_bytes)));
            }
        }
        let output = self.inner.invoke_with_args(args)?;
        let produced = columnar_bytes(&output, 1);
        if produced > max_bytes as u128 {
            return Err(refused(self.refusal(produced, max_bytes)));
        }
        if args_all_scalar {
            let made = CONSTANTS.try_with(|made| made.bytes.fetch_add(produced as u64, Ordering::Relaxed) as u128 + produced).unwrap_or(0);
            if made > max_bytes as u128 {
                return Err(refuse_constant(DataFusionError::ResourcesExhausted(format!(
                    "the query's constants would take {made} bytes, more than the {} MiB a query's constants may take",
                    max_bytes >> 20
                ))));
            }
        }
        Ok(output)
    }
}

/// `a || b` on text, as a function, so that the bound above holds for it: DataFusion evaluates the
/// operator without any function call to wrap, and `s || s` over a column doubles it, as often as a
/// query nests it. Same types, result and column names as the operator; the evaluation is
/// DataFusion's own.
#[derive(Debug, PartialEq, Eq, Hash)]
struct ConcatOperator {
    signature: Signature,
}

impl ConcatOperator {
    fn new() -> Self {
        ConcatOperator { signature: Signature::user_defined(Volatility::Immutable) }
    }
}

/// The function's name: what EXPLAIN shows for a rewritten `||`.
const CONCAT_OPERATOR: &str = "||";

fn two<T>(values: &[T]) -> Result<(&T, &T)> {
    match values {
        [left, right] => Ok((left, right)),
        other => Err(DataFusionError::Plan(format!("|| takes two operands, got {}", other.len()))),
    }
}

impl ScalarUDFImpl for ConcatOperator {
    fn name(&self) -> &str {
        CONCAT_OPERATOR
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let (left, right) = two(arg_types)?;
        let (left, right) = BinaryTypeCoercer::new(left, &Operator::StringConcat, right).get_input_types()?;
        Ok(vec![left, right])
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let (left, right) = two(arg_types)?;
        BinaryTypeCoercer::new(left, &Operator::StringConcat, right).get_result_type()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        let (left, right) = two(args)?;
        Ok(format!("{} || {}", left.schema_name(), right.schema_name()))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        use datafusion::physical_expr::expressions::{BinaryExpr as Physical, Column};
        let all_scalar = constant(&args.args);
        let rows = call_rows(&args);
        let arrays: Vec<ArrayRef> = args.args.iter().map(|a| a.to_array(rows)).collect::<Result<_>>()?;
        let fields: Vec<Field> = args.arg_fields.iter().enumerate().map(|(i, f)| f.as_ref().clone().with_name(format!("{i}"))).collect();
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?;
        let operator = Physical::new(Arc::new(Column::new("0", 0)), Operator::StringConcat, Arc::new(Column::new("1", 1)));
        let result = operator.evaluate(&batch)?;
        match (result, all_scalar) {
            (ColumnarValue::Array(array), true) => Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&array, 0)?)),
            (result, _) => Ok(result),
        }
    }
}

/// Rewrites `a || b` on text (not on lists: those are `array_concat` already) into [`ConcatOperator`].
#[derive(Debug)]
struct ConcatOperatorRewrite {
    memory_bytes: usize,
}

impl FunctionRewrite for ConcatOperatorRewrite {
    fn name(&self) -> &str {
        "bearwatch_bounded_concat"
    }

    fn rewrite(&self, expr: Expr, schema: &DFSchema, _: &ConfigOptions) -> Result<Transformed<Expr>> {
        let Expr::BinaryExpr(BinaryExpr { left, op: Operator::StringConcat, right }) = expr else {
            return Ok(Transformed::no(expr));
        };
        let nested = |e: &Expr| {
            e.get_type(schema).is_ok_and(|t| matches!(t, DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(..)))
        };
        if nested(&left) || nested(&right) {
            return Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr { left, op: Operator::StringConcat, right })));
        }
        let function = Arc::new(wrap(ScalarUDF::new_from_impl(ConcatOperator::new()), self.memory_bytes));
        Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction::new_udf(function, vec![*left, *right]))))
    }
}

/// The pattern of `~`, `LIKE` or `SIMILAR TO` on its way to the operator, held to
/// [`MAX_PATTERN_BYTES`]: DataFusion compiles such patterns into regular expressions (`LIKE` too,
/// unless it is a prefix, suffix or substring), and the operators call no function to wrap. Value,
/// type and column name are the pattern's own; a literal pattern is checked once, while planning.
#[derive(Debug, PartialEq, Eq, Hash)]
struct PatternGuard {
    signature: Signature,
}

const PATTERN_GUARD: &str = "bounded_pattern";

impl ScalarUDFImpl for PatternGuard {
    fn name(&self) -> &str {
        PATTERN_GUARD
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        arg_types.first().cloned().ok_or_else(|| DataFusionError::Plan(format!("{PATTERN_GUARD} takes one argument")))
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        Ok(args.first().map(|a| a.schema_name().to_string()).unwrap_or_default())
    }

    /// A literal pattern over the bound fails the query while planning (a failed constant call
    /// would otherwise be kept for run time, its literal in the plan).
    fn simplify(&self, args: Vec<Expr>, _: &SimplifyContext) -> Result<ExprSimplifyResult> {
        if let [Expr::Literal(value, _)] = args.as_slice() {
            check_pattern(&ColumnarValue::Scalar(value.clone()), 1)?;
        }
        Ok(ExprSimplifyResult::Original(args))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let pattern = args.args.into_iter().next().ok_or_else(|| DataFusionError::Plan(format!("{PATTERN_GUARD} takes one argument")))?;
        check_pattern(&pattern, args.number_rows)?;
        Ok(pattern)
    }
}

/// Puts [`PatternGuard`] around the pattern of every `~`, `~*`, `!~`, `!~*`, `LIKE`, `ILIKE` and
/// `SIMILAR TO`.
#[derive(Debug)]
struct PatternRewrite;

impl FunctionRewrite for PatternRewrite {
    fn name(&self) -> &str {
        "bearwatch_bounded_pattern"
    }

    fn rewrite(&self, expr: Expr, _: &DFSchema, _: &ConfigOptions) -> Result<Transformed<Expr>> {
        guard_pattern(expr)
    }
}

/// `expr` with [`PatternGuard`] around its pattern, when it is a pattern-matching operator.
fn guard_pattern(expr: Expr) -> Result<Transformed<Expr>> {
    let guarded = |pattern: Box<Expr>| -> Box<Expr> {
        let guard = Arc::new(ScalarUDF::new_from_impl(PatternGuard { signature: Signature::any(1, Volatility::Immutable) }));
        Box::new(Expr::ScalarFunction(ScalarFunction::new_udf(guard, vec![*pattern])))
    };
    let done = |pattern: &Expr| matches!(pattern, Expr::ScalarFunction(f) if f.name() == PATTERN_GUARD);
    Ok(match expr {
        Expr::BinaryExpr(BinaryExpr { ref right, .. }) if done(right) => Transformed::no(expr),
        Expr::Like(ref like) | Expr::SimilarTo(ref like) if done(&like.pattern) => Transformed::no(expr),
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if regex_operator(&op) =>
        {
            Transformed::yes(Expr::BinaryExpr(BinaryExpr { left, op, right: guarded(right) }))
        }
        Expr::Like(like) => Transformed::yes(Expr::Like(datafusion::logical_expr::Like { pattern: guarded(like.pattern), ..like })),
        Expr::SimilarTo(like) => Transformed::yes(Expr::SimilarTo(datafusion::logical_expr::Like { pattern: guarded(like.pattern), ..like })),
        other => Transformed::no(other),
    })
}

/// Refuses a plan in which an operator would repeat large literals on every row of its input: a
/// literal folded from `repeat('x', 1000000)` in a projection over a table is copied into each row
/// of each batch (8,192 × 1 MB), outside the memory pool. The bound is the query memory over the
/// rows a batch of the operator's input can hold (one for `SELECT repeat(…)` alone).
#[derive(Debug)]
pub struct NoBroadcast {
    pub memory_bytes: usize,
}

impl datafusion::physical_optimizer::PhysicalOptimizerRule for NoBroadcast {
    fn optimize(
        &self,
        plan: Arc<dyn datafusion::physical_plan::ExecutionPlan>,
        config: &ConfigOptions,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        use datafusion::common::stats::Precision;
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let batch_rows = usize::from(config.execution.batch_size) as u128;
        let statistics = datafusion::physical_plan::statistics::StatisticsContext::new();
        let whole = datafusion::physical_plan::statistics::StatisticsArgs::new();
        plan.apply(|node| {
            let mut literal_bytes: u128 = 0;
            node.apply_expressions(&mut |expr| {
                literal_bytes += repeated_literal_bytes(expr);
                Ok(TreeNodeRecursion::Continue)
            })?;
            if literal_bytes == 0 {
                return Ok(TreeNodeRecursion::Continue);
            }
            // Rows a batch of the operator's input can hold: a batch, or fewer where that is known.
            let rows_of = |plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>| match statistics.compute(plan.as_ref(), &whole) {
                Ok(s) => match s.num_rows {
                    Precision::Exact(n) => (n as u128).min(batch_rows),
                    _ => batch_rows,
                },
                Err(_) => batch_rows,
            };
            let children = node.children();
            let rows = if children.is_empty() { rows_of(node) } else { children.into_iter().map(rows_of).max().unwrap_or(batch_rows) };
            if literal_bytes * rows.max(1) > self.memory_bytes as u128 {
                return Err(DataFusionError::ResourcesExhausted(format!(
                    "{} repeats constants of {literal_bytes} bytes on each of up to {rows} rows a batch, more than the query memory",
                    node.name()
                )));
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(plan)
    }

    fn name(&self) -> &str {
        "bearwatch_no_broadcast"
    }

    fn schema_check(&self) -> bool {
        true
    }
}

/// Bytes of the large literals in `expr` that evaluating it copies onto every row. A literal that
/// a comparison, `LIKE` or a regular expression's pattern reads as one value (Arrow compares
/// against a scalar) is never copied: `WHERE id = '<300 KB>'` holds one 300 KB value, not 8,192.
fn repeated_literal_bytes(expr: &Arc<dyn datafusion::physical_expr::PhysicalExpr>) -> u128 {
    use datafusion::physical_expr::expressions::{BinaryExpr, LikeExpr, Literal};
    if let Some(literal) = expr.downcast_ref::<Literal>() {
        let bytes = scalar_bytes(literal.value());
        return if bytes > BROADCAST_LITERAL_BYTES { bytes } else { 0 };
    }
    let like = expr.downcast_ref::<LikeExpr>().is_some();
    let read_as_scalar = |operand: usize| match expr.downcast_ref::<BinaryExpr>().map(|b| *b.op()) {
        _ if like => true,
        Some(
            Operator::Eq
            | Operator::NotEq
            | Operator::Lt
            | Operator::LtEq
            | Operator::Gt
            | Operator::GtEq
            | Operator::IsDistinctFrom
            | Operator::IsNotDistinctFrom
            | Operator::LikeMatch
            | Operator::ILikeMatch
            | Operator::NotLikeMatch
            | Operator::NotILikeMatch,
        ) => true,
        Some(op) if regex_operator(&op) => operand == 1,
        _ => false,
    };
    expr.children()
        .into_iter()
        .enumerate()
        .filter(|(operand, child)| !(read_as_scalar(*operand) && child.downcast_ref::<Literal>().is_some()))
        .map(|(_, child)| repeated_literal_bytes(child))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice counts only its own values: text, binary and lists alike.
    #[test]
    fn a_slice_counts_its_own_bytes() {
        use datafusion::arrow::array::{BinaryArray, LargeStringArray, ListArray, StringArray};
        use datafusion::arrow::datatypes::Int32Type;
        let text = StringArray::from(vec!["a", "bcd", "efghij"]);
        assert_eq!(array_bytes(&text), 10 + 3 * 4);
        assert_eq!(array_bytes(&text.slice(1, 1)), 3 + 4);
        assert_eq!(array_bytes(&LargeStringArray::from(vec!["ab", "cde"]).slice(1, 1)), 3 + 8);
        assert_eq!(array_bytes(&BinaryArray::from(vec![b"xy".as_ref(), b"z".as_ref()]).slice(0, 1)), 2 + 4);
        let lists = ListArray::from_iter_primitive::<Int32Type, _, _>(vec![Some(vec![Some(1), Some(2)]), Some(vec![Some(3), Some(4), Some(5)])]);
        assert_eq!(array_bytes(&lists.slice(1, 1)), 3 * 4 + 4);
        assert_eq!(elements(&lists.slice(1, 1), false), 3);
    }

    /// `array_to_string` joins the innermost elements of nested lists: its estimate counts them.
    #[test]
    fn nested_lists_count_their_innermost_elements() {
        let inner = ScalarValue::new_list_nullable(&[ScalarValue::from("a"), ScalarValue::from("b"), ScalarValue::from("c")], &DataType::Utf8);
        let outer = ScalarValue::new_list_nullable(&[ScalarValue::List(inner.clone()), ScalarValue::List(inner)], &DataType::new_list(DataType::Utf8, true));
        let arg = ColumnarValue::Scalar(ScalarValue::List(outer));
        assert_eq!(list_len(&arg, 0, false), 2);
        assert_eq!(list_len(&arg, 0, true), 6);
    }
}
