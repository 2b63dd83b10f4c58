//! Decode: raw records (JSON objects from Kafka or NDJSON, rows of CSV) into typed records.
//!
//! A JSON record is one object with the entity key, an optional timestamp and the model's
//! features by name (numbers; arrays of numbers for image models). Other fields are skipped
//! without being materialised, so wide records cost little. A record that cannot be decoded is
//! never fatal: the caller routes the [`DecodeError`] to the dead-letter sink with its reason.

use std::fmt;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};

/// Why a record could not be scored. The label is the `reason` of the dead letter and of the
/// `anomalyd_dead_letters_total` metric.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("record is {size} bytes, over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("record is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("record is not a JSON object")]
    NotAnObject,
    #[error("record has no key field `{0}`")]
    MissingKey(String),
    #[error("record has no field `{0}`")]
    MissingField(String),
    #[error("field `{0}` is not a number")]
    NotANumber(String),
    #[error("field `{0}` is not finite (NaN, infinite, or beyond float32)")]
    NonFinite(String),
    #[error("field `{field}` has {found} values, the model expects {expected}")]
    WrongDimensions {
        field: String,
        found: usize,
        expected: usize,
    },
    /// A key or timestamp longer than [`MAX_TEXT_BYTES`]: each key's state holds its key and
    /// timestamps, so their length bounds the memory `max_keys` keys take.
    #[error("field `{field}` is {size} bytes, over the limit of {limit} for keys and timestamps")]
    TooLong {
        field: &'static str,
        size: usize,
        limit: usize,
    },
    /// A CSV row (of `anomalyd score`) that cannot be split into fields.
    #[error("row is not valid CSV: {0}")]
    MalformedCsv(String),
}

impl DecodeError {
    /// Every reason label, for metrics to start at zero.
    pub const REASONS: [&'static str; 10] = [
        "too_large",
        "invalid_json",
        "not_an_object",
        "missing_key",
        "missing_field",
        "not_a_number",
        "non_finite",
        "wrong_dimensions",
        "too_long",
        "malformed_csv",
    ];

    /// A short, stable, low-cardinality label.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::InvalidJson(_) => "invalid_json",
            DecodeError::NotAnObject => "not_an_object",
            DecodeError::MissingKey(_) => "missing_key",
            DecodeError::MissingField(_) => "missing_field",
            DecodeError::NotANumber(_) => "not_a_number",
            DecodeError::NonFinite(_) => "non_finite",
            DecodeError::WrongDimensions { .. } => "wrong_dimensions",
            DecodeError::TooLong { .. } => "too_long",
            DecodeError::MalformedCsv(_) => "malformed_csv",
        }
    }
}

/// The longest key or timestamp accepted, in bytes.
pub const MAX_TEXT_BYTES: usize = 1024;

/// The record, if its key and timestamp are within [`MAX_TEXT_BYTES`].
fn bounded(record: Record) -> Result<Record, DecodeError> {
    let texts = [
        ("key", Some(&record.key)),
        ("timestamp", record.timestamp.as_ref()),
    ];
    for (field, text) in texts {
        if let Some(t) = text.filter(|t| t.len() > MAX_TEXT_BYTES) {
            return Err(DecodeError::TooLong {
                field,
                size: t.len(),
                limit: MAX_TEXT_BYTES,
            });
        }
    }
    Ok(record)
}

/// A decoded record: one row of features (or one image) of one entity.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub key: String,
    /// The timestamp as it appeared in the record (text), if it had one.
    pub timestamp: Option<String>,
    /// `F` values for row records, `F·H·W` for image records, in the model's feature order.
    pub values: Vec<f32>,
}

/// Where a record that could not be decoded belongs: its key and timestamp, when they could be
/// read from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Whereabouts {
    pub key: Option<String>,
    pub timestamp: Option<String>,
}

/// Decodes records for one pipeline's model.
#[derive(Debug, Clone)]
pub struct Decoder {
    key_field: String,
    timestamp_field: String,
    /// Record field name of each model feature, in the model's order.
    fields: Vec<String>,
    /// Values per feature: 1 for rows, H·W for image models.
    per_field: usize,
    max_bytes: usize,
    /// The key of records without one: a file of one series, scored offline.
    default_key: Option<String>,
}

impl Decoder {
    pub fn new(
        key_field: &str,
        timestamp_field: &str,
        fields: Vec<String>,
        per_field: usize,
        max_bytes: usize,
    ) -> Decoder {
        Decoder {
            key_field: key_field.to_string(),
            timestamp_field: timestamp_field.to_string(),
            fields,
            per_field,
            max_bytes,
            default_key: None,
        }
    }

    /// Records without a key (and CSV without a key column) belong to the one series `key`:
    /// the common case of a file offline, not of a stream of many entities.
    pub fn with_default_key(mut self, key: &str) -> Decoder {
        self.default_key = Some(key.to_string());
        self
    }

    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    pub fn key_field(&self) -> &str {
        &self.key_field
    }

    pub fn timestamp_field(&self) -> &str {
        &self.timestamp_field
    }

    /// Decodes one JSON object.
    pub fn decode_json(&self, bytes: &[u8]) -> Result<Record, DecodeError> {
        if bytes.len() > self.max_bytes {
            return Err(DecodeError::TooLarge {
                size: bytes.len(),
                limit: self.max_bytes,
            });
        }
        match self.decode_flat(bytes) {
            Some(record) => Ok(record),
            None => self.decode_complete(bytes),
        }
        .and_then(bounded)
    }

    /// The complete path: serde_json with the record visitor.
    fn decode_complete(&self, bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let seed = RecordSeed { decoder: self };
        let fields = match seed.deserialize(&mut de) {
            Ok(f) => f,
            Err(e) => return Err(classify(e)),
        };
        de.end()
            .map_err(|e| DecodeError::InvalidJson(e.to_string()))?;
        fields.finish(self)
    }

    /// The fast path for the common record: one flat object of string keys and timestamps and
    /// numeric features (other fields may be anything). It returns `None`, and the complete
    /// serde_json path decides, at the first thing it is not sure about: an escape, a numeric or
    /// missing key, an array feature, a malformed number, anything after the object. So it
    /// only ever accepts what the complete path accepts, with the same values (a property test
    /// holds the two to that).
    fn decode_flat(&self, b: &[u8]) -> Option<Record> {
        // One value per field, and few enough fields for the bit set of those seen.
        if self.per_field != 1 || self.fields.len() > 63 {
            return None;
        }
        // One UTF-8 check of the whole record; the scanner then slices it at ASCII delimiters.
        let text = std::str::from_utf8(b).ok()?;
        let mut p = Scan { s: text, b, i: 0 };
        p.ws();
        p.eat(b'{')?;
        let mut key = None;
        let mut timestamp = None;
        let mut values = vec![0.0f32; self.fields.len()];
        let mut seen = 0u64;
        p.ws();
        if p.peek()? == b'}' {
            return None;
        }
        loop {
            p.ws();
            let name = p.string()?;
            p.ws();
            p.eat(b':')?;
            p.ws();
            if same(name, &self.key_field) {
                key = Some(p.scalar()?);
            } else if same(name, &self.timestamp_field) {
                timestamp = Some(p.scalar()?);
            } else if let Some(i) = self.fields.iter().position(|f| same(name, f)) {
                let v = p.number()? as f32;
                if !v.is_finite() {
                    return None;
                }
                values[i] = v;
                seen |= 1 << i;
            } else {
                p.skip_value()?;
            }
            p.ws();
            match p.next()? {
                b',' => continue,
                b'}' => break,
                _ => return None,
            }
        }
        p.ws();
        if p.i != b.len() || seen != (1 << self.fields.len()) - 1 {
            return None;
        }
        let key = key.filter(|k| !k.is_empty())?;
        Some(Record {
            key: key.to_string(),
            timestamp: timestamp.filter(|t| !t.is_empty()).map(str::to_string),
            values,
        })
    }

    /// The key and timestamp of a JSON record that could not be decoded, as far as they can be
    /// read (a JSON object with them at its top, as strings or numbers; else the default key):
    /// what `anomalyd score` writes on the row of its error.
    pub fn locate_json(&self, bytes: &[u8]) -> Whereabouts {
        let Ok(serde_json::Value::Object(object)) = serde_json::from_slice(bytes) else {
            return self.unlocated();
        };
        // Read as the decoder reads them (`Scalar`), so that a row's key is spelled the same
        // whether the record decoded or not (`1e3` is "1000" both ways).
        let text = |field: &str| {
            <Scalar as de::Deserialize>::deserialize(object.get(field)?)
                .ok()?
                .0
        };
        Whereabouts {
            key: text(&self.key_field).or_else(|| self.default_key.clone()),
            timestamp: text(&self.timestamp_field),
        }
    }

    /// Where a record that could not be read at all belongs: to the default key, if there is one.
    pub fn unlocated(&self) -> Whereabouts {
        Whereabouts {
            key: self.default_key.clone(),
            timestamp: None,
        }
    }

    /// The key and timestamp of a CSV row that could not be decoded, as far as they can be read.
    pub fn locate_csv(&self, row: &csv::StringRecord, columns: &CsvColumns) -> Whereabouts {
        let cell = |column: Option<usize>| {
            column
                .and_then(|i| row.get(i))
                .filter(|t| !t.is_empty())
                .map(str::to_string)
        };
        Whereabouts {
            key: cell(columns.key).or_else(|| self.default_key.clone()),
            timestamp: cell(columns.timestamp),
        }
    }

    /// Decodes one CSV row, given the header's column index of each field.
    pub fn decode_csv(
        &self,
        row: &csv::StringRecord,
        columns: &CsvColumns,
    ) -> Result<Record, DecodeError> {
        let key = columns
            .key
            .and_then(|i| row.get(i))
            .filter(|k| !k.is_empty())
            .or(self.default_key.as_deref())
            .ok_or_else(|| DecodeError::MissingKey(self.key_field.clone()))?;
        let timestamp = columns
            .timestamp
            .and_then(|i| row.get(i))
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let mut values = Vec::with_capacity(self.fields.len());
        for (name, &col) in self.fields.iter().zip(&columns.features) {
            let text = row
                .get(col)
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| DecodeError::MissingField(name.clone()))?;
            let v: f64 = text
                .parse()
                .map_err(|_| DecodeError::NotANumber(name.clone()))?;
            values.push(finite(v, name)?);
        }
        bounded(Record {
            key: key.to_string(),
            timestamp,
            values,
        })
    }

    /// Finds the columns of a CSV header. Only row models can read CSV.
    pub fn csv_columns(&self, header: &csv::StringRecord) -> Result<CsvColumns, String> {
        if self.per_field != 1 {
            return Err("image models read NDJSON, not CSV".into());
        }
        let find = |name: &str| header.iter().position(|h| h.trim() == name);
        let key = find(&self.key_field);
        if key.is_none() && self.default_key.is_none() {
            return Err(format!("the header has no key column `{}`", self.key_field));
        }
        let missing: Vec<&str> = self
            .fields
            .iter()
            .filter(|f| find(f).is_none())
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "the header has no column for feature(s) {missing:?}"
            ));
        }
        Ok(CsvColumns {
            key,
            timestamp: find(&self.timestamp_field),
            features: self.fields.iter().map(|f| find(f).unwrap_or(0)).collect(),
        })
    }
}

/// Column indexes of a CSV file's fields.
#[derive(Debug, Clone)]
pub struct CsvColumns {
    key: Option<usize>,
    timestamp: Option<usize>,
    features: Vec<usize>,
}

fn finite(v: f64, field: &str) -> Result<f32, DecodeError> {
    let f = v as f32;
    if f.is_finite() {
        Ok(f)
    } else {
        Err(DecodeError::NonFinite(field.to_string()))
    }
}

/// Our own errors travel through serde as custom messages with this prefix.
const TAG: &str = "\u{1}anomalyd:";

fn classify(e: serde_json::Error) -> DecodeError {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix(TAG) {
        // Custom messages are `reason|field|found|expected`; serde_json appends the position.
        let rest = rest.split(" at line ").next().unwrap_or(rest);
        let parts: Vec<&str> = rest.splitn(4, '|').collect();
        let field = parts.get(1).copied().unwrap_or_default().to_string();
        return match parts[0] {
            "not_a_number" => DecodeError::NotANumber(field),
            "non_finite" => DecodeError::NonFinite(field),
            "not_an_object" => DecodeError::NotAnObject,
            "wrong_dimensions" => DecodeError::WrongDimensions {
                field,
                found: parts.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
                expected: parts.get(3).and_then(|s| s.parse().ok()).unwrap_or(0),
            },
            _ => DecodeError::InvalidJson(rest.to_string()),
        };
    }
    DecodeError::InvalidJson(text)
}

fn tagged<E: de::Error>(reason: &str, field: &str) -> E {
    E::custom(format!("{TAG}{reason}|{field}"))
}

/// String equality that rejects on length and last byte before comparing the rest: field names
/// like `f0`..`f7` share a length and differ at the end.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.as_bytes().last() == b.as_bytes().last() && a == b
}

/// A cursor over JSON bytes for [`Decoder::decode_flat`]; every method returns `None` where
/// the fast path gives up.
struct Scan<'a> {
    s: &'a str,
    /// `s` as bytes.
    b: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let len = self.b[start..]
            .iter()
            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
        if self.b[start + len] != b'"' {
            return None;
        }
        self.i = start + len + 1;
        self.s.get(start..start + len)
    }

    /// A key or timestamp: a string, or an integer kept as its text, which is what the complete
    /// path's `to_string` of it gives when the integer is canonical (no `-0`) and fits 64 bits
    /// (beyond, serde_json reads a float). Anything else is left to the complete path.
    fn scalar(&mut self) -> Option<&'a str> {
        if self.peek()? == b'"' {
            return self.string();
        }
        let text = self.number_text()?;
        let integer = !text.contains(['.', 'e', 'E']) && text != "-0";
        (integer && (text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok())).then_some(text)
    }

    /// A number.
    fn number(&mut self) -> Option<f64> {
        // The grammar checked by `number_text` is ASCII; Rust's parser rounds correctly, as
        // serde_json does with `float_roundtrip`.
        self.number_text()?.parse().ok()
    }

    /// The text of a number in JSON's grammar: `-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number_text(&mut self) -> Option<&'a str> {
        let start = self.i;
        let digits = |s: &mut Self| {
            let from = s.i;
            while let Some(b'0'..=b'9') = s.peek() {
                s.i += 1;
            }
            s.i > from
        };
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                digits(self);
            }
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            if !digits(self) {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if !digits(self) {
                return None;
            }
        }
        self.s.get(start..self.i)
    }

    /// Skips a scalar value of a field the record does not need; nested values are left to the
    /// complete path.
    fn skip_value(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'-' | b'0'..=b'9' => self.number_text().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }
}

/// The fields found in one object, before checking that nothing is missing.
struct Found {
    key: Option<String>,
    timestamp: Option<String>,
    values: Vec<f32>,
    seen: Vec<bool>,
}

impl Found {
    fn finish(self, decoder: &Decoder) -> Result<Record, DecodeError> {
        let key = self
            .key
            .or_else(|| decoder.default_key.clone())
            .ok_or_else(|| DecodeError::MissingKey(decoder.key_field.clone()))?;
        if let Some(i) = self.seen.iter().position(|s| !s) {
            return Err(DecodeError::MissingField(decoder.fields[i].clone()));
        }
        Ok(Record {
            key,
            timestamp: self.timestamp,
            values: self.values,
        })
    }
}

struct RecordSeed<'a> {
    decoder: &'a Decoder,
}

impl<'de> DeserializeSeed<'de> for RecordSeed<'_> {
    type Value = Found;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Found, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RecordSeed<'_> {
    type Value = Found;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let dec = self.decoder;
        let mut found = Found {
            key: None,
            timestamp: None,
            values: vec![0.0; dec.fields.len() * dec.per_field],
            seen: vec![false; dec.fields.len()],
        };
        while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if same(&name, &dec.key_field) {
                found.key = map.next_value::<Scalar>()?.0;
            } else if same(&name, &dec.timestamp_field) {
                found.timestamp = map.next_value::<Scalar>()?.0;
            } else if let Some(i) = dec.fields.iter().position(|f| same(&name, f)) {
                let out = &mut found.values[i * dec.per_field..(i + 1) * dec.per_field];
                map.next_value_seed(Numbers {
                    field: &dec.fields[i],
                    out,
                })?;
                found.seen[i] = true;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Found, A::Error> {
        Err(tagged("not_an_object", ""))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Found, E> {
        Err(tagged("not_an_object", ""))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Found, E> {
        Err(tagged("not_an_object", ""))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Found, E> {
        Err(tagged("not_an_object", ""))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Found, E> {
        Err(tagged("not_an_object", ""))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Found, E> {
        Err(tagged("not_an_object", ""))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Found, E> {
        Err(tagged("not_an_object", ""))
    }
}

/// A key or timestamp: text or a number, kept as text; anything else counts as absent.
struct Scalar(Option<String>);

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a number")
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar((!v.is_empty()).then(|| v.to_string())))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_unit<E>(self) -> Result<Scalar, E> {
                Ok(Scalar(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Scalar, E> {
                Ok(Scalar(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Scalar, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Scalar(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Scalar, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Scalar(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// One feature's value(s), written straight into the record's value buffer.
struct Numbers<'a> {
    field: &'a str,
    out: &'a mut [f32],
}

impl<'de> DeserializeSeed<'de> for Numbers<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Numbers<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number")
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if self.out.len() != 1 {
            return Err(wrong_dims(self.field, 1, self.out.len()));
        }
        self.out[0] = finite(v, self.field).map_err(|_| tagged("non_finite", self.field))?;
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        self.visit_f64(v as f64)
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let expected = self.out.len();
        let mut n = 0;
        while let Some(v) = seq.next_element::<NumberOnly>()? {
            let Some(v) = v.0 else {
                return Err(tagged("not_a_number", self.field));
            };
            if n < expected {
                self.out[n] =
                    finite(v, self.field).map_err(|_| tagged("non_finite", self.field))?;
            }
            n += 1;
        }
        if n != expected {
            return Err(wrong_dims(self.field, n, expected));
        }
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(tagged("not_a_number", self.field))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(tagged("not_a_number", self.field))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(tagged("not_a_number", self.field))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(tagged("not_a_number", self.field))
    }
}

fn wrong_dims<E: de::Error>(field: &str, found: usize, expected: usize) -> E {
    E::custom(format!("{TAG}wrong_dimensions|{field}|{found}|{expected}"))
}

/// An array element: a number, or `None` for anything else.
struct NumberOnly(Option<f64>);

impl<'de> de::Deserialize<'de> for NumberOnly {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<NumberOnly, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NumberOnly;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E>(self, v: f64) -> Result<NumberOnly, E> {
                Ok(NumberOnly(Some(v)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<NumberOnly, E> {
                Ok(NumberOnly(Some(v as f64)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<NumberOnly, E> {
                Ok(NumberOnly(Some(v as f64)))
            }
            fn visit_str<E>(self, _: &str) -> Result<NumberOnly, E> {
                Ok(NumberOnly(None))
            }
            fn visit_bool<E>(self, _: bool) -> Result<NumberOnly, E> {
                Ok(NumberOnly(None))
            }
            fn visit_unit<E>(self) -> Result<NumberOnly, E> {
                Ok(NumberOnly(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<NumberOnly, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(NumberOnly(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<NumberOnly, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(NumberOnly(None))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10, findings 1 and 12: a key of 600 KB sat in memory with its state (2000 such
    /// keys took 1.1 GB under `max_keys`) and twice in each output message; keys and timestamps
    /// are now bounded, so the state of `max_keys` keys is too.
    #[test]
    fn keys_and_timestamps_over_the_limit_are_refused() {
        let d = Decoder::new("host", "ts", vec!["cpu".into()], 1, 1 << 20);
        let record = |key: &str, ts: &str| format!(r#"{{"host":"{key}","ts":"{ts}","cpu":1}}"#);
        let at_limit = "k".repeat(MAX_TEXT_BYTES);
        assert!(d.decode_json(record(&at_limit, "t").as_bytes()).is_ok());
        for (key, ts, field) in [
            ("k".repeat(600_000), "t".to_string(), "key"),
            ("k".to_string(), "t".repeat(MAX_TEXT_BYTES + 1), "timestamp"),
        ] {
            let e = d.decode_json(record(&key, &ts).as_bytes()).unwrap_err();
            assert!(
                matches!(e, DecodeError::TooLong { field: f, .. } if f == field),
                "{e}"
            );
            assert_eq!(e.reason(), "too_long");
        }
    }

    fn row_decoder() -> Decoder {
        Decoder::new("host", "ts", vec!["a".into(), "b".into()], 1, 1024)
    }

    #[test]
    fn decodes_a_wide_record_and_skips_other_fields() {
        let r = row_decoder()
            .decode_json(br#"{"x":{"deep":[1,2,{"y":null}]},"b":2.5,"host":"h1","ts":"2026-01-01T00:00:00Z","a":-1,"z":"s"}"#)
            .unwrap();
        assert_eq!(r.key, "h1");
        assert_eq!(r.timestamp.as_deref(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(r.values, vec![-1.0, 2.5]);
    }

    #[test]
    fn numeric_keys_and_timestamps_become_text() {
        let r = row_decoder()
            .decode_json(br#"{"host":17,"ts":1767225600,"a":1,"b":2}"#)
            .unwrap();
        assert_eq!(r.key, "17");
        assert_eq!(r.timestamp.as_deref(), Some("1767225600"));
    }

    #[test]
    fn a_bad_record_is_located_as_far_as_it_can_be_read() {
        let d = row_decoder();
        let at = |key: Option<&str>, timestamp: Option<&str>| Whereabouts {
            key: key.map(str::to_string),
            timestamp: timestamp.map(str::to_string),
        };
        let bad = br#"{"host":"h1","ts":"2026-01-01T00:00:00Z","a":"x","b":2}"#;
        assert!(d.decode_json(bad).is_err());
        assert_eq!(
            d.locate_json(bad),
            at(Some("h1"), Some("2026-01-01T00:00:00Z"))
        );
        assert_eq!(d.locate_json(br#"{"host":17,"a":1}"#), at(Some("17"), None));
        for key in ["17", "1e3", "-2.5", "\"h1\""] {
            let good = format!(r#"{{"host":{key},"ts":1767225600,"a":1,"b":2}}"#);
            let decoded = d.decode_json(good.as_bytes()).unwrap();
            let bad = good.replace(r#""a":1"#, r#""a":"x""#);
            assert_eq!(
                d.locate_json(bad.as_bytes()),
                at(Some(&decoded.key), decoded.timestamp.as_deref()),
                "{key}"
            );
        }
        assert_eq!(d.locate_json(br#"{"host":"h1","a":1"#), at(None, None));
        assert_eq!(d.locate_json(b"[1,2]"), at(None, None));
        let header = csv::StringRecord::from(vec!["ts", "host", "a", "b"]);
        let columns = d.csv_columns(&header).unwrap();
        let row = csv::StringRecord::from(vec!["t0", "h2", "oops", "1"]);
        assert!(d.decode_csv(&row, &columns).is_err());
        assert_eq!(d.locate_csv(&row, &columns), at(Some("h2"), Some("t0")));
    }

    #[test]
    fn every_bad_record_gets_its_reason() {
        let d = row_decoder();
        let cases: &[(&[u8], &str)] = &[
            (b"{\"host\":\"h\",\"a\":1", "invalid_json"),
            (b"not json", "invalid_json"),
            (b"[1,2]", "not_an_object"),
            (b"42", "not_an_object"),
            (br#"{"a":1,"b":2}"#, "missing_key"),
            (br#"{"host":"h","a":1}"#, "missing_field"),
            (br#"{"host":"h","a":"1","b":2}"#, "not_a_number"),
            (br#"{"host":"h","a":null,"b":2}"#, "not_a_number"),
            (br#"{"host":"h","a":1e39,"b":2}"#, "non_finite"),
            (br#"{"host":"h","a":1e999,"b":2}"#, "invalid_json"),
            (br#"{"host":"h","a":[1,2],"b":2}"#, "wrong_dimensions"),
            (br#"{"host":"h","a":1,"b":2} trailing"#, "invalid_json"),
        ];
        for (input, reason) in cases {
            let e = d.decode_json(input).unwrap_err();
            assert_eq!(
                e.reason(),
                *reason,
                "{} -> {e}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn oversized_and_deeply_nested_records_are_refused() {
        let d = row_decoder();
        let big = format!(r#"{{"host":"h","a":1,"b":2,"pad":"{}"}}"#, "x".repeat(2000));
        assert_eq!(
            d.decode_json(big.as_bytes()).unwrap_err().reason(),
            "too_large"
        );
        // Nesting is skipped without recursion, so no depth can exhaust the stack.
        let deep = Decoder::new("host", "ts", vec!["a".into()], 1, 1 << 20);
        let (open, close) = ("[".repeat(100_000), "]".repeat(100_000));
        let ignored = format!(r#"{{"host":"h","a":1,"n":{open}{close}}}"#);
        assert_eq!(deep.decode_json(ignored.as_bytes()).unwrap().values, [1.0]);
        let in_feature = format!(r#"{{"host":"h","a":{open}1{close}}}"#);
        assert_eq!(
            deep.decode_json(in_feature.as_bytes())
                .unwrap_err()
                .reason(),
            "not_a_number"
        );
        let unclosed = format!(r#"{{"host":"h","a":1,"n":{open}"#);
        assert_eq!(
            deep.decode_json(unclosed.as_bytes()).unwrap_err().reason(),
            "invalid_json"
        );
    }

    mod fast_path {
        use super::super::*;
        use proptest::prelude::*;

        fn number() -> impl Strategy<Value = String> {
            "-?(0|[1-9][0-9]{0,12})(\\.[0-9]{1,9})?([eE][+-]?[0-9]{1,3})?"
        }

        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                // Numbers, in and out of JSON's grammar.
                number(),
                "[+-]?[0-9]{0,3}\\.?[0-9]{0,3}",
                prop::sample::select(vec![
                    "1e39",
                    "-1e400",
                    "NaN",
                    "inf",
                    "01",
                    "1.",
                    ".5",
                    "-",
                    "-0",
                    "18446744073709551615",
                    "18446744073709551616",
                    "-9223372036854775808",
                    "-9223372036854775809",
                    "1712000000123"
                ])
                .prop_map(String::from),
                // Strings, with and without escapes, and non-ASCII.
                "\"[a-zA-Z0-9 :T.-]{0,12}\"",
                "\"[a-z]{0,3}\\\\[nt\"][a-z]{0,3}\"",
                "\"[é😀a-z]{0,4}\"",
                prop::sample::select(vec![
                    "true",
                    "false",
                    "null",
                    "[]",
                    "[1,2]",
                    "{}",
                    "{\"a\":[1]}"
                ])
                .prop_map(String::from),
            ]
        }

        fn key() -> impl Strategy<Value = String> {
            prop::sample::select(vec!["host", "ts", "a", "b", "other", "hos", "hostt"])
                .prop_map(String::from)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

            /// Whatever the fast path accepts, the complete path accepts with the same record.
            #[test]
            fn agrees_with_the_complete_path(
                extra in prop::collection::vec((key(), value()), 0..5),
                host in prop_oneof![3 => "\"[a-z0-9-]{1,10}\"".boxed(), 1 => value().boxed()],
                a in prop_oneof![3 => number().boxed(), 1 => value().boxed()],
                b in prop_oneof![3 => number().boxed(), 1 => value().boxed()],
                order in Just(()).prop_perturb(|_, mut rng| rng.random::<u64>()),
                ws in prop::sample::select(vec!["", " ", "\n", "\t "]),
                trailing in prop::sample::select(vec!["", " ", "\n", "x", ",", "}"]),
            ) {
                // The needed fields, with any values, among random others, in a random order.
                let mut fields = extra;
                fields.extend([("host".to_string(), host), ("a".to_string(), a), ("b".to_string(), b)]);
                let n = fields.len();
                fields.rotate_left(order as usize % n);
                let body: Vec<String> = fields.iter().map(|(k, v)| format!("{ws}\"{k}\"{ws}:{ws}{v}{ws}")).collect();
                let text = format!("{ws}{{{}}}{trailing}", body.join(","));
                let d = Decoder::new("host", "ts", vec!["a".into(), "b".into()], 1, 1 << 20);
                if let Some(fast) = d.decode_flat(text.as_bytes()) {
                    let complete = d.decode_complete(text.as_bytes());
                    prop_assert_eq!(Ok(fast), complete, "{}", text);
                }
            }
        }

        #[test]
        fn the_usual_record_takes_the_fast_path() {
            let d = Decoder::new("host", "ts", vec!["a".into(), "b".into()], 1, 1024);
            let r = d.decode_flat(
                br#"{"host":"h1","ts":"2026-01-01T00:00:00Z","a":1.5,"x":"y","b":-2e3,"z":null}"#,
            );
            assert_eq!(r.map(|r| r.values), Some(vec![1.5, -2000.0]));
            assert!(
                d.decode_flat(br#"{"host":"h\u0031","a":1,"b":2}"#)
                    .is_none(),
                "escapes go the complete way"
            );
            let r = d.decode_flat(br#"{"host":7,"ts":1712000000,"a":1,"b":2}"#);
            assert_eq!(
                r.map(|r| (r.key, r.timestamp)),
                Some(("7".into(), Some("1712000000".into()))),
                "integer keys and timestamps are kept as their text"
            );
            assert!(
                d.decode_flat(br#"{"host":"h","ts":1.5,"a":1,"b":2}"#)
                    .is_none(),
                "a float timestamp goes the complete way"
            );
        }
    }

    #[test]
    fn image_records_read_arrays() {
        let d = Decoder::new("k", "ts", vec!["c0".into()], 4, 1024);
        let r = d.decode_json(br#"{"k":"img","c0":[1,2,3,4]}"#).unwrap();
        assert_eq!(r.values, vec![1.0, 2.0, 3.0, 4.0]);
        let e = d.decode_json(br#"{"k":"img","c0":[1,2,3]}"#).unwrap_err();
        assert_eq!(
            e,
            DecodeError::WrongDimensions {
                field: "c0".into(),
                found: 3,
                expected: 4
            }
        );
        assert_eq!(
            d.decode_json(br#"{"k":"img","c0":[1,2,"x",4]}"#)
                .unwrap_err()
                .reason(),
            "not_a_number"
        );
    }

    #[test]
    fn csv_rows_decode_by_header() {
        let d = row_decoder();
        let header = csv::StringRecord::from(vec!["ts", "b", "host", "a"]);
        let cols = d.csv_columns(&header).unwrap();
        let r = d
            .decode_csv(&csv::StringRecord::from(vec!["t1", "2", "h", "1"]), &cols)
            .unwrap();
        assert_eq!((r.key.as_str(), r.values.clone()), ("h", vec![1.0, 2.0]));
        let e = d
            .decode_csv(&csv::StringRecord::from(vec!["t1", "NaN", "h", "1"]), &cols)
            .unwrap_err();
        assert_eq!(e.reason(), "non_finite");
        let missing = csv::StringRecord::from(vec!["ts", "host", "a"]);
        assert!(d.csv_columns(&missing).unwrap_err().contains("\"b\""));
    }
}
