//! Metrics exposition for `/metrics`: one model, rendered as OpenMetrics 1.0 (what
//! Prometheus asks for) or as the Prometheus text format 0.0.4 (what `promtool check
//! metrics` and older scrapers read), and the transfer-duration histogram.
//!
//! Services write their figures into an [`Exposition`] as families of samples; the
//! renderer takes care of the suffixes, `# UNIT`, `# EOF` and label escaping.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

/// The media type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The media type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Prometheus,
}

impl Format {
    /// The format a scraper asked for with its `Accept` header.
    pub fn from_accept(accept: &str) -> Self {
        if accept.contains("application/openmetrics-text") {
            Self::OpenMetrics
        } else {
            Self::Prometheus
        }
    }

    /// The `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Self::Prometheus => PROMETHEUS_CONTENT_TYPE,
        }
    }
}

/// The kind of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Monotonic; samples are written with the `_total` suffix.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Cumulative buckets with `_bucket`, `_count` and `_sum`.
    Histogram,
    /// Constant 1 with labels carrying the information (`_info`).
    Info,
}

/// Label pairs of one sample.
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Metric families being written, in order.
#[derive(Debug)]
pub struct Exposition {
    format: Format,
    out: String,
}

impl Exposition {
    /// An empty exposition in `format`.
    pub fn new(format: Format) -> Self {
        Self {
            format,
            out: String::with_capacity(8192),
        }
    }

    /// Starts a family. `name` has no suffix (`_total`, `_info`); `unit`, if any, must
    /// be the last part of `name` (e.g. `bytes`, `seconds`).
    pub fn family(&mut self, name: &str, kind: Kind, unit: Option<&str>, help: &str) {
        debug_assert!(
            unit.is_none_or(|u| name.ends_with(u)),
            "{name}: unit {unit:?}"
        );
        let prometheus = self.format == Format::Prometheus;
        let typ = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
            // The Prometheus text format has no info type: a gauge of 1.
            Kind::Info if prometheus => "gauge",
            Kind::Info => "info",
        };
        // Prometheus text names a family by its sample name; OpenMetrics without suffix.
        let exposed = match kind {
            Kind::Counter if prometheus => format!("{name}_total"),
            Kind::Info if prometheus => format!("{name}_info"),
            _ => name.to_owned(),
        };
        let _ = writeln!(self.out, "# HELP {exposed} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {exposed} {typ}");
        if let (Format::OpenMetrics, Some(unit)) = (self.format, unit) {
            let _ = writeln!(self.out, "# UNIT {exposed} {unit}");
        }
    }

    /// A counter sample of the family `name` (written as `name_total`).
    pub fn counter(&mut self, name: &str, labels: Labels<'_>, value: u64) {
        self.sample(name, "_total", labels, &value.to_string());
    }

    /// A counter sample with a fractional value, e.g. seconds (written as `name_total`).
    pub fn counter_f64(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.sample(name, "_total", labels, &fmt_f64(value));
    }

    /// A gauge sample.
    pub fn gauge(&mut self, name: &str, labels: Labels<'_>, value: f64) {
        self.sample(name, "", labels, &fmt_f64(value));
    }

    /// The sample of an info family (`name_info{labels} 1`).
    pub fn info(&mut self, name: &str, labels: Labels<'_>) {
        self.sample(name, "_info", labels, "1");
    }

    /// The samples of one histogram: cumulative `buckets` as (upper bound, count), the
    /// total count and the sum.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: Labels<'_>,
        buckets: &[(f64, u64)],
        count: u64,
        sum: f64,
    ) {
        for (le, n) in buckets {
            let le = fmt_f64(*le);
            let mut with_le: Vec<(&str, &str)> = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(name, "_bucket", &with_le, &n.to_string());
        }
        let mut inf: Vec<(&str, &str)> = labels.to_vec();
        inf.push(("le", "+Inf"));
        self.sample(name, "_bucket", &inf, &count.to_string());
        self.sample(name, "_count", labels, &count.to_string());
        self.sample(name, "_sum", labels, &fmt_f64(sum));
    }

    fn sample(&mut self, name: &str, suffix: &str, labels: Labels<'_>, value: &str) {
        self.out.push_str(name);
        self.out.push_str(suffix);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }

    /// The families written so far, without the end marker, to [`Exposition::append`]
    /// to another exposition of the same format.
    pub fn into_body(self) -> String {
        self.out
    }

    /// Appends families from [`Exposition::into_body`].
    pub fn append(&mut self, body: &str) {
        self.out.push_str(body);
    }

    /// The finished text.
    pub fn finish(mut self) -> String {
        if self.format == Format::OpenMetrics {
            self.out.push_str("# EOF\n");
        }
        self.out
    }
}

/// Floats as both formats expect: integers without a fraction, `+Inf`/`-Inf`/`NaN`.
fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Upper bounds of the transfer-duration buckets, in seconds: from an iPXE script on a
/// LAN (milliseconds) to a WinPE image over a slow link (minutes).
pub const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Durations recorded in an HDR histogram (microseconds, 3 significant digits, up to an
/// hour, longer values clamped), exposed as Prometheus buckets.
#[derive(Debug)]
pub struct DurationHistogram {
    hdr: Mutex<hdrhistogram::Histogram<u64>>,
    /// Exact sum in microseconds (the HDR histogram only keeps bucketed values).
    sum_us: AtomicU64,
}

/// The longest duration the histogram distinguishes: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

impl Default for DurationHistogram {
    fn default() -> Self {
        Self {
            hdr: Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, MAX_US, 3)
                    .expect("constant histogram bounds are valid"),
            ),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl DurationHistogram {
    /// Records one duration.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.hdr
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .saturating_record(us.clamp(1, MAX_US));
    }

    /// The duration at quantile `q` (0..=1), or `None` when nothing was recorded.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let h = self.hdr.lock().unwrap_or_else(PoisonError::into_inner);
        (!h.is_empty()).then(|| Duration::from_micros(h.value_at_quantile(q)))
    }

    /// Writes the histogram's samples (family started by the caller).
    pub fn write(&self, exp: &mut Exposition, name: &str, labels: Labels<'_>) {
        let (buckets, count) = {
            let h = self.hdr.lock().unwrap_or_else(PoisonError::into_inner);
            let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
                .iter()
                .map(|&le| {
                    // HDR keeps 3 significant digits: a bucket also holds values up to
                    // 0.1 % above its bound.
                    let us = (le * 1e6) as u64;
                    (le, h.count_between(0, us))
                })
                .collect();
            (buckets, h.len())
        };
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        exp.histogram(name, labels, &buckets, count, sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_suffix_in_both_formats_and_openmetrics_ends_with_eof() {
        for format in [Format::OpenMetrics, Format::Prometheus] {
            let mut e = Exposition::new(format);
            e.family(
                "netboot_x_bytes",
                Kind::Counter,
                Some("bytes"),
                "Bytes \\ sent.",
            );
            e.counter("netboot_x_bytes", &[("service", "tftp")], 42);
            e.family("netboot_build", Kind::Info, None, "Build.");
            e.info("netboot_build", &[("version", "1\"2\n")]);
            let text = e.finish();
            assert!(
                text.contains("netboot_x_bytes_total{service=\"tftp\"} 42\n"),
                "{text}"
            );
            assert!(
                text.contains("netboot_build_info{version=\"1\\\"2\\n\"} 1\n"),
                "{text}"
            );
            assert!(text.contains("# HELP"), "{text}");
            match format {
                Format::OpenMetrics => {
                    assert!(text.contains("# TYPE netboot_x_bytes counter\n"), "{text}");
                    assert!(text.contains("# UNIT netboot_x_bytes bytes\n"), "{text}");
                    assert!(text.contains("Bytes \\\\ sent."), "{text}");
                    assert!(text.ends_with("# EOF\n"), "{text}");
                }
                Format::Prometheus => {
                    assert!(
                        text.contains("# TYPE netboot_x_bytes_total counter\n"),
                        "{text}"
                    );
                    assert!(text.contains("# TYPE netboot_build_info gauge\n"), "{text}");
                    assert!(
                        !text.contains("# UNIT") && !text.contains("# EOF"),
                        "{text}"
                    );
                }
            }
        }
    }

    #[test]
    fn duration_buckets_are_cumulative_and_exact_at_their_bounds() {
        let h = DurationHistogram::default();
        for ms in [3, 10, 10, 400, 2000, 7_200_000] {
            h.record(Duration::from_millis(ms));
        }
        let mut e = Exposition::new(Format::OpenMetrics);
        e.family("d_seconds", Kind::Histogram, Some("seconds"), "D.");
        h.write(&mut e, "d_seconds", &[]);
        let text = e.finish();
        let bucket = |le: &str| -> u64 {
            let prefix = format!("d_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no bucket {le} in {text}"))
                .parse()
                .expect("count")
        };
        assert_eq!(bucket("0.005"), 1);
        // 10 ms exactly lands in le="0.01" (upper bounds are inclusive).
        assert_eq!(bucket("0.01"), 3);
        assert_eq!(bucket("0.25"), 3);
        assert_eq!(bucket("0.5"), 4);
        assert_eq!(bucket("2.5"), 5);
        // Two hours is beyond the histogram's range: only +Inf holds it.
        assert_eq!(bucket("600"), 5);
        assert_eq!(bucket("+Inf"), 6);
        assert!(text.contains("d_seconds_count 6\n"), "{text}");
        assert!(text.contains("d_seconds_sum 7202.423\n"), "{text}");
        // Quantiles come from HDR buckets: within 0.1 % of the recorded value.
        let p50 = h.quantile(0.5).expect("recorded");
        assert!(
            p50 >= Duration::from_millis(10) && p50 <= Duration::from_micros(10_010),
            "{p50:?}"
        );
    }
}
