//! Replay: `anomalyd score`, a file (CSV or NDJSON) through the daemon's own decode → window →
//! infer → threshold → alert code, one output row per input row.
//!
//! It is the daemon minus Kafka: the same [`Detector`], the same batching, so a replayed file
//! gives exactly the scores the daemon would have given the same records in the same order.

use std::io::{BufRead, Write};
use std::sync::Arc;

use serde::Serialize;

use crate::config::PipelineConfig;
use crate::decode::{DecodeError, Record, Whereabouts};
use crate::detect::{Detector, DetectorConfig, DetectorError, Origin, Outcome, Top};
use crate::model::{Model, ModelError};
use crate::shadow::{Decision, PromotionConfig, Shadow};

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read the input: {0}")]
    Read(#[from] std::io::Error),
    #[error("cannot read the CSV input: {0}")]
    Csv(#[from] csv::Error),
    #[error("the CSV input does not fit the model: {0}")]
    Header(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("pipelines.{pipeline}.{source}")]
    Detector {
        pipeline: String,
        source: DetectorError,
    },
    #[error("model {path} (from row {row}) cannot replace the one before it: {reason}")]
    Swap {
        row: u64,
        path: String,
        reason: String,
    },
}

/// The models a replay scores with: `first` from the first row on, then each of `swaps` from its
/// row on (0-based, as the output's rows), swapped in through the daemon's hot-reload path
/// ([`Detector::set_model`]): each key keeps its window and alert state, and its threshold
/// restarts from the new model's calibration. A schedule of models by row is how a retraining
/// loop is replayed offline.
///
/// `candidates` replay the daemon's other way to change models: each is scored in the shadow
/// of the serving model from its row on and promoted or refused by the pipeline's promotion
/// rule ([`crate::shadow`]), exactly as the daemon would with that file placed beside the model
/// at that point of the stream.
pub struct Models {
    pub first: Arc<Model>,
    /// In ascending row order.
    pub swaps: Vec<(u64, Arc<Model>)>,
    /// In ascending row order.
    pub candidates: Vec<(u64, Arc<Model>)>,
}

impl From<Arc<Model>> for Models {
    fn from(first: Arc<Model>) -> Models {
        Models {
            first,
            swaps: Vec::new(),
            candidates: Vec::new(),
        }
    }
}

/// Record formats of files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Ndjson,
}

impl Format {
    /// The format a path's extension implies (`.csv`, or `.ndjson`/`.jsonl`/`.json`).
    pub fn from_path(path: &str) -> Option<Format> {
        let lower = path.to_ascii_lowercase();
        if lower.ends_with(".csv") {
            Some(Format::Csv)
        } else if [".ndjson", ".jsonl", ".json"]
            .iter()
            .any(|e| lower.ends_with(e))
        {
            Some(Format::Ndjson)
        } else {
            None
        }
    }
}

/// Counts of one replay.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub rows: u64,
    pub scored: u64,
    pub warming: u64,
    pub errors: u64,
    pub anomalies: u64,
    pub alerts_fired: u64,
    pub candidates_promoted: u64,
    pub candidates_refused: u64,
}

/// One output row, borrowed from the scored record: writing a row allocates nothing.
#[derive(Debug, Serialize, Default)]
struct Row<'a> {
    key: Option<&'a str>,
    timestamp: Option<&'a str>,
    score: Option<f64>,
    threshold: Option<f64>,
    anomaly_score: Option<f64>,
    is_anomaly: Option<bool>,
    top_features: TopNames<'a>,
    /// `firing` or `resolved` when this row changed its key's alert state.
    event: Option<&'static str>,
    /// Why the row could not be scored.
    error: Option<&'a str>,
}

/// The names of a row's top features, serialised as a list.
#[derive(Debug, Default)]
struct TopNames<'a> {
    top: Top,
    names: &'a [String],
}

impl Serialize for TopNames<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.top.names(self.names))
    }
}

const CSV_HEADER: [&str; 9] = [
    "key",
    "timestamp",
    "score",
    "threshold",
    "anomaly_score",
    "is_anomaly",
    "top_features",
    "event",
    "error",
];

/// A number as CSV text (shortest round-tripping form); empty when absent.
fn float(buf: &mut ryu::Buffer, v: Option<f64>) -> &str {
    match v {
        None => "",
        Some(x) if x.is_finite() => buf.format_finite(x),
        Some(x) if x.is_nan() => "NaN",
        Some(x) if x > 0.0 => "inf",
        Some(_) => "-inf",
    }
}

/// Where rows go, in the output's format.
enum RowSink<W: Write> {
    Csv {
        out: Box<csv::Writer<W>>,
        /// Reused for the joined top features.
        scratch: String,
    },
    Ndjson(std::io::BufWriter<W>),
}

impl<W: Write> RowSink<W> {
    fn new(format: Format, out: W) -> Result<RowSink<W>, ReplayError> {
        Ok(match format {
            Format::Csv => {
                let mut w = csv::WriterBuilder::new()
                    .buffer_capacity(1 << 16)
                    .from_writer(out);
                w.write_record(CSV_HEADER)?;
                RowSink::Csv {
                    out: Box::new(w),
                    scratch: String::new(),
                }
            }
            Format::Ndjson => RowSink::Ndjson(std::io::BufWriter::with_capacity(1 << 16, out)),
        })
    }

    fn write(&mut self, row: &Row) -> Result<(), ReplayError> {
        match self {
            RowSink::Csv { out, scratch } => {
                scratch.clear();
                let TopNames { top, names } = &row.top_features;
                for (i, name) in top.names(names).enumerate() {
                    if i > 0 {
                        scratch.push(';');
                    }
                    scratch.push_str(name);
                }
                let mut buffers = [ryu::Buffer::new(), ryu::Buffer::new(), ryu::Buffer::new()];
                let [b1, b2, b3] = &mut buffers;
                out.write_record([
                    row.key.unwrap_or_default(),
                    row.timestamp.unwrap_or_default(),
                    float(b1, row.score),
                    float(b2, row.threshold),
                    float(b3, row.anomaly_score),
                    match row.is_anomaly {
                        Some(true) => "true",
                        Some(false) => "false",
                        None => "",
                    },
                    scratch,
                    row.event.unwrap_or_default(),
                    row.error.unwrap_or_default(),
                ])?;
            }
            RowSink::Ndjson(w) => {
                serde_json::to_writer(&mut *w, row).map_err(std::io::Error::from)?;
                w.write_all(b"\n")?;
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<(), ReplayError> {
        match self {
            RowSink::Csv { mut out, .. } => out.flush()?,
            RowSink::Ndjson(mut w) => w.flush()?,
        }
        Ok(())
    }
}

/// The replay of one input: batches of rows through the detector, in order.
struct Replayer<W: Write> {
    detector: Detector,
    batch_size: usize,
    source: Arc<str>,
    /// The rows of the current batch, in order: decoded ones went to `records`, failed ones keep
    /// their place here with their error.
    slots: Vec<Result<(), (DecodeError, Whereabouts)>>,
    records: Vec<(Origin, Record)>,
    sink: RowSink<W>,
    summary: Summary,
    /// Models still to swap in, the next one last.
    swaps: Vec<(u64, Arc<Model>)>,
    /// Candidates still to come, the next one last; the one in the shadow.
    candidates: Vec<(u64, Arc<Model>)>,
    shadow: Option<Shadow>,
    /// Builds candidates' detectors, and judges them.
    pipeline: (String, DetectorConfig, PromotionConfig),
}

impl<W: Write> Replayer<W> {
    fn push(
        &mut self,
        parsed: Result<Record, (DecodeError, Whereabouts)>,
    ) -> Result<(), ReplayError> {
        let index = self.summary.rows + self.slots.len() as u64;
        while self.swaps.last().is_some_and(|(row, _)| *row <= index) {
            let (row, model) = self.swaps.pop().expect("a swap is due");
            self.flush()?;
            let path = model.path.display().to_string();
            self.detector
                .set_model(model)
                .map_err(|reason| ReplayError::Swap { row, path, reason })?;
        }
        while self.candidates.last().is_some_and(|(row, _)| *row <= index) {
            let (row, model) = self.candidates.pop().expect("a candidate is due");
            self.flush()?;
            let (name, cfg, _) = &self.pipeline;
            let path = model.path.display().to_string();
            let shadow = cfg
                .build(name, model)
                .map_err(|e| e.to_string())
                .and_then(|candidate| Shadow::new(&self.detector, candidate));
            match shadow {
                Ok(shadow) => self.shadow = Some(shadow),
                Err(why) => self.refused(row, &path, &why),
            }
        }
        match parsed {
            Ok(record) => {
                let origin = Origin {
                    topic: self.source.clone(),
                    partition: 0,
                    offset: index as i64,
                };
                self.records.push((origin, record));
                self.slots.push(Ok(()));
            }
            Err(e) => self.slots.push(Err(e)),
        }
        if self.slots.len() >= self.batch_size {
            self.flush()?;
        }
        Ok(())
    }

    /// A candidate did not get to serve: said on stderr, as the daemon logs it.
    fn refused(&mut self, row: u64, path: &str, why: &str) {
        self.summary.candidates_refused += 1;
        eprintln!("row {row}: refused candidate {path}: {why}");
    }

    fn flush(&mut self) -> Result<(), ReplayError> {
        // The candidate's inference first (the records are drained for the serving model's).
        let shadowed = self.shadow.as_mut().map(|shadow| {
            let mut batch = shadow.prepare(self.records.clone());
            let samples = std::mem::take(&mut batch.samples);
            let inference = batch.model.infer(&samples, batch.sample_count());
            (batch, inference)
        });
        let mut batch = self.detector.prepare(self.records.drain(..));
        let samples = std::mem::take(&mut batch.samples);
        let inference = batch.model.infer(&samples, batch.sample_count())?;
        let outcomes = self.detector.judge(batch, &inference);
        if let Some((batch, inference)) = shadowed {
            let shadow = self.shadow.as_mut().expect("in the shadow");
            let decision = match inference {
                Ok(inference) => shadow.compare(&outcomes, batch, &inference, &self.pipeline.2),
                Err(e) => Some(Decision::Refuse(format!("its inference failed: {e}"))),
            };
            if let Some(decision) = decision {
                let shadow = self.shadow.take().expect("in the shadow");
                let row = self.summary.rows + self.slots.len() as u64;
                let (figures, path) = (
                    shadow.comparison().describe(),
                    shadow.model().path.display().to_string(),
                );
                match shadow.conclude(decision, &mut self.detector) {
                    Ok(()) => {
                        self.summary.candidates_promoted += 1;
                        eprintln!("row {row}: promoted candidate {path} {figures}");
                    }
                    Err(why) => self.refused(row, &path, &format!("{figures}: {why}")),
                }
            }
        }
        let mut outcomes = outcomes.into_iter();
        let summary = &mut self.summary;
        for slot in self.slots.drain(..) {
            summary.rows += 1;
            match slot {
                Err((e, at)) => {
                    summary.errors += 1;
                    let error = format!("{}: {e}", e.reason());
                    self.sink.write(&Row {
                        key: at.key.as_deref(),
                        timestamp: at.timestamp.as_deref(),
                        error: Some(&error),
                        ..Row::default()
                    })?;
                }
                Ok(()) => match outcomes.next().expect("one outcome per record") {
                    Outcome::Warming { key, timestamp, .. } => {
                        summary.warming += 1;
                        self.sink.write(&Row {
                            key: Some(&key),
                            timestamp: timestamp.as_deref(),
                            ..Row::default()
                        })?;
                    }
                    Outcome::NonFinite { record, .. } => {
                        summary.errors += 1;
                        let error = format!(
                            "{}: the model's reconstruction error on it is not a finite number",
                            crate::detect::NON_FINITE_SCORE
                        );
                        self.sink.write(&Row {
                            key: Some(&record.key),
                            timestamp: record.timestamp.as_deref(),
                            error: Some(&error),
                            ..Row::default()
                        })?;
                    }
                    Outcome::Scored(s) => {
                        summary.scored += 1;
                        summary.anomalies += u64::from(s.verdict.is_anomaly);
                        let event = s.event.as_ref().map(|e| e.event.as_str());
                        summary.alerts_fired += u64::from(event == Some("firing"));
                        self.sink.write(&Row {
                            key: Some(&s.key),
                            timestamp: s.timestamp.as_deref(),
                            score: Some(s.score),
                            threshold: Some(s.verdict.threshold),
                            anomaly_score: Some(s.verdict.anomaly_score),
                            is_anomaly: Some(s.verdict.is_anomaly),
                            top_features: TopNames {
                                top: s.top,
                                names: &s.model.contract.features,
                            },
                            event,
                            error: None,
                        })?;
                    }
                },
            }
        }
        Ok(())
    }
}

/// What to score: records in a format.
pub struct Input<R> {
    pub reader: R,
    pub format: Format,
    /// The key of records without one (a file of one series, offline); `None` when every record
    /// must name its key.
    pub series: Option<String>,
}

/// Replays `input` through `models` with pipeline `cfg`'s settings, writing rows to `output`.
/// Every model is checked against the pipeline and the first model before a row is read.
pub fn replay(
    name: &str,
    cfg: &PipelineConfig,
    models: impl Into<Models>,
    input: Input<impl BufRead>,
    output: impl Write,
    output_format: Format,
) -> Result<Summary, ReplayError> {
    let Models {
        first,
        mut swaps,
        mut candidates,
    } = models.into();
    let build = |model| {
        cfg.detector()
            .build(name, model)
            .map_err(|source| ReplayError::Detector {
                pipeline: name.to_string(),
                source,
            })
    };
    for (row, model) in &swaps {
        let swap = |reason| ReplayError::Swap {
            row: *row,
            path: model.path.display().to_string(),
            reason,
        };
        build(model.clone())?;
        build(first.clone())?
            .set_model(model.clone())
            .map_err(swap)?;
    }
    // Next one last; of two at the same row, the one listed last is the one that stays.
    for schedule in [&mut swaps, &mut candidates] {
        schedule.sort_by_key(|(row, _)| *row);
        schedule.reverse();
    }
    let detector = build(first)?;
    let mut decoder = detector.decoder().clone();
    if let Some(key) = &input.series {
        decoder = decoder.with_default_key(key);
    }
    let batch_size = cfg.batch.max_size.max(1);
    let mut r = Replayer {
        detector,
        batch_size,
        source: Arc::from("replay"),
        slots: Vec::with_capacity(batch_size),
        records: Vec::with_capacity(batch_size),
        sink: RowSink::new(output_format, output)?,
        summary: Summary::default(),
        swaps,
        candidates,
        shadow: None,
        pipeline: (name.to_string(), cfg.detector(), cfg.promotion),
    };
    // Lines are read whole up to the record limit and skipped beyond it, so memory follows
    // `max_record_bytes`, not the longest line; a bad line is one row's error, never the run's.
    let limit = cfg.max_record_bytes;
    let mut lines = Lines::new(input.reader, limit);
    // A record that could not be read at all: its row belongs to the default key, if any.
    let nowhere = |e| (e, decoder.unlocated());
    match input.format {
        Format::Ndjson => {
            while let Some(line) = lines.next()? {
                match line {
                    Ok(text) if text.trim_ascii().is_empty() => {}
                    Ok(text) => {
                        let text = text.trim_ascii();
                        r.push(
                            decoder
                                .decode_json(text)
                                .map_err(|e| (e, decoder.locate_json(text))),
                        )?
                    }
                    Err(size) => r.push(Err(nowhere(DecodeError::TooLarge { size, limit })))?,
                }
            }
        }
        Format::Csv => {
            let (columns, mut csv) = csv_header(&mut lines, &decoder)?;
            while let Some(line) = lines.next()? {
                let row = match line {
                    Ok(text) if text.trim_ascii().is_empty() => continue,
                    Ok(text) => csv
                        .parse(text)
                        .map_err(|e| nowhere(DecodeError::MalformedCsv(e))),
                    Err(size) => Err(nowhere(DecodeError::TooLarge { size, limit })),
                };
                r.push(row.and_then(|row| {
                    decoder
                        .decode_csv(row, &columns)
                        .map_err(|e| (e, decoder.locate_csv(row, &columns)))
                }))?;
            }
        }
    }
    r.flush()?;
    r.sink.finish()?;
    Ok(r.summary)
}

/// Reads the header (the first line that is not blank), guessing the delimiter from it, and
/// finds the columns the decoder needs.
fn csv_header<R: BufRead>(
    lines: &mut Lines<R>,
    decoder: &crate::decode::Decoder,
) -> Result<(crate::decode::CsvColumns, CsvLine), ReplayError> {
    loop {
        let Some(line) = lines.next()? else {
            return Err(ReplayError::Header("the input is empty".into()));
        };
        let text = line.map_err(|size| {
            ReplayError::Header(format!(
                "the header line is {size} bytes, over max_record_bytes"
            ))
        })?;
        if text.trim_ascii().is_empty() {
            continue;
        }
        let separator = delimiter(text);
        let mut csv = CsvLine::new(separator);
        let header = csv
            .parse(text)
            .map_err(|e| ReplayError::Header(format!("the header: {e}")))?;
        let columns = decoder.csv_columns(header).map_err(|e| {
            let shown: Vec<&str> = header.iter().take(30).collect();
            ReplayError::Header(format!(
                "{e} (the header, read as {}-separated, has: {})",
                delimiter_name(separator),
                shown.join(", ")
            ))
        })?;
        return Ok((columns, csv));
    }
}

/// The delimiters a CSV header is tried with.
const DELIMITERS: [u8; 4] = [b',', b';', b'\t', b'|'];

/// The delimiter of a CSV file, from its header: the most frequent of `,` `;` tab `|`, a comma
/// when none occurs (a one-column file).
fn delimiter(header: &[u8]) -> u8 {
    let count = |d: u8| header.iter().filter(|&&b| b == d).count();
    DELIMITERS
        .into_iter()
        .filter(|&d| count(d) > 0)
        .max_by_key(|&d| (count(d), d == b','))
        .unwrap_or(b',')
}

fn delimiter_name(d: u8) -> &'static str {
    match d {
        b';' => "semicolon",
        b'\t' => "tab",
        b'|' => "pipe",
        _ => "comma",
    }
}

/// The lines of an input, each at most `limit` bytes (its terminator aside).
struct Lines<R> {
    input: R,
    limit: usize,
    line: Vec<u8>,
}

impl<R: BufRead> Lines<R> {
    fn new(input: R, limit: usize) -> Lines<R> {
        Lines {
            input,
            limit,
            line: Vec::with_capacity(1024),
        }
    }

    /// The next line with its terminator, or the length of a line over the limit (skipped
    /// without being held in memory); `None` at the end of the input.
    fn next(&mut self) -> std::io::Result<Option<Result<&[u8], usize>>> {
        self.line.clear();
        let (mut size, mut ended) = (0, false);
        loop {
            let chunk = self.input.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            let (taken, done) = match memchr::memchr(b'\n', chunk) {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if size + taken <= self.limit + 1 {
                self.line.extend_from_slice(&chunk[..taken]);
            }
            size += taken;
            self.input.consume(taken);
            if done {
                ended = true;
                break;
            }
        }
        if size == 0 {
            return Ok(None);
        }
        let content = size - usize::from(ended);
        Ok(Some(if content > self.limit {
            Err(content)
        } else {
            Ok(&self.line)
        }))
    }
}

/// Parses one line of CSV. Records are one line each: a quoted field that runs past its line is
/// broken quoting (it would swallow the rows after it), reported as that row's error.
struct CsvLine {
    parser: csv_core::Reader,
    out: Vec<u8>,
    ends: Vec<usize>,
    row: csv::StringRecord,
}

impl CsvLine {
    fn new(delimiter: u8) -> CsvLine {
        CsvLine {
            parser: csv_core::ReaderBuilder::new().delimiter(delimiter).build(),
            out: Vec::new(),
            ends: Vec::new(),
            row: csv::StringRecord::new(),
        }
    }
}

impl CsvLine {
    fn parse(&mut self, line: &[u8]) -> Result<&csv::StringRecord, String> {
        use csv_core::ReadRecordResult;
        self.parser.reset();
        self.out.resize(line.len() + 1, 0);
        self.ends.resize(line.len() + 2, 0);
        // A terminator ends the record, even for a last line without one.
        let (result, _, _, fields) = match line.last() {
            Some(b'\n') => self.parser.read_record(line, &mut self.out, &mut self.ends),
            _ => {
                let (_, _, out, ends) =
                    self.parser.read_record(line, &mut self.out, &mut self.ends);
                let (result, read, more_out, more_ends) =
                    self.parser
                        .read_record(b"\n", &mut self.out[out..], &mut self.ends[ends..]);
                (result, read, out + more_out, ends + more_ends)
            }
        };
        if result != ReadRecordResult::Record {
            return Err("a quoted field is not closed on its line".into());
        }
        self.row.clear();
        let mut start = 0;
        for &end in &self.ends[..fields] {
            let field = std::str::from_utf8(&self.out[start..end])
                .map_err(|_| format!("field {} is not valid UTF-8", self.row.len() + 1))?;
            self.row.push_field(field);
            start = end;
        }
        Ok(&self.row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10, finding 13: `score` held a whole line in memory however long; now a line over
    /// the record limit is skipped as it streams by, reported by its length.
    #[test]
    fn a_line_over_the_limit_is_skipped_without_being_held() {
        let mut input = vec![b'x'; 10 << 20];
        input.extend_from_slice(b"\nshort\nlast");
        let mut lines = Lines::new(std::io::BufReader::new(input.as_slice()), 1000);
        assert_eq!(lines.next().unwrap(), Some(Err(10 << 20)));
        assert!(
            lines.line.capacity() < 64 << 10,
            "{}",
            lines.line.capacity()
        );
        assert_eq!(lines.next().unwrap(), Some(Ok(&b"short\n"[..])));
        assert_eq!(lines.next().unwrap(), Some(Ok(&b"last"[..])));
        assert_eq!(lines.next().unwrap(), None);
        let mut exact = Lines::new(&b"12345\n123456"[..], 5);
        assert_eq!(exact.next().unwrap(), Some(Ok(&b"12345\n"[..])));
        assert_eq!(exact.next().unwrap(), Some(Err(6)));
    }

    /// Issue 10, finding 13: a broken quote swallowed every row after it into one field, and a
    /// byte that is not UTF-8 aborted the run; now each is its own row's error.
    #[test]
    fn a_malformed_csv_line_is_its_own_error() {
        let mut csv = CsvLine::new(b',');
        let fields = |r: &csv::StringRecord| r.iter().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            fields(csv.parse(b"a,\"b,c\",d\r\n").unwrap()),
            ["a", "b,c", "d"]
        );
        assert_eq!(
            fields(csv.parse(b"a,\"say \"\"hi\"\"\"").unwrap()),
            ["a", "say \"hi\""]
        );
        assert_eq!(fields(csv.parse(b",\n").unwrap()), ["", ""]);
        assert!(csv.parse(b"a,\"b,c\n").unwrap_err().contains("not closed"));
        assert!(csv
            .parse(b"a,\xff\xfe,c\n")
            .unwrap_err()
            .contains("field 2"));
        assert_eq!(
            fields(csv.parse(b"x,y").unwrap()),
            ["x", "y"],
            "usable after errors"
        );
    }

    /// Issue 16, item 1: the delimiter is read from the header, a comma when in doubt.
    #[test]
    fn the_delimiter_is_the_headers_most_frequent() {
        assert_eq!(delimiter(b"a,b,c\n"), b',');
        assert_eq!(delimiter(b"datetime;a;b;c\n"), b';');
        assert_eq!(delimiter(b"t\ta\tb\n"), b'\t');
        assert_eq!(delimiter(b"a|b\n"), b'|');
        assert_eq!(delimiter(b"value\n"), b',');
        assert_eq!(delimiter(b"a;b,c\n"), b',', "a tie goes to the comma");
        let mut csv = CsvLine::new(b';');
        let row = csv.parse(b"x;\"1;5\";2\n").unwrap();
        assert_eq!(row.iter().collect::<Vec<_>>(), ["x", "1;5", "2"]);
    }
}
