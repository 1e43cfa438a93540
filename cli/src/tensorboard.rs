//! TensorBoard event files: TFRecord framing around `tensorboard.Event` protobufs.
//!
//! A record is `length (u64 LE) · masked CRC-32C of length (u32 LE) · data · masked CRC-32C of
//! data`; the first event carries the file version, each other one a summary of one scalar.
//! Only the fields written here are declared (the field numbers are TensorBoard's
//! `event.proto` and `summary.proto`); a scalar is `simple_value`, a 32-bit float, which is
//! what TensorBoard's scalar dashboard reads.

use prost::Message;
use std::io::Write;

#[derive(Clone, PartialEq, Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
}

#[derive(Clone, PartialEq, Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<SummaryValue>,
}

#[derive(Clone, PartialEq, Message)]
struct SummaryValue {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC (a CRC of data that holds CRCs is weak, so it is rotated and offset).
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = CRC32C.checksum(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

pub struct EventWriter<W: Write> {
    out: W,
    wall_time: f64,
}

impl<W: Write> EventWriter<W> {
    /// Starts a file: the version record first. Every event gets `wall_time` (seconds since
    /// the epoch): GetMetrics' points carry no time of their own.
    pub fn new(out: W, wall_time: f64) -> std::io::Result<EventWriter<W>> {
        let mut w = EventWriter { out, wall_time };
        w.record(&Event {
            wall_time,
            step: 0,
            file_version: Some("brain.Event:2".to_string()),
            summary: None,
        })?;
        Ok(w)
    }

    pub fn scalar(&mut self, tag: &str, step: u64, value: f64) -> std::io::Result<()> {
        self.record(&Event {
            wall_time: self.wall_time,
            step: i64::try_from(step).unwrap_or(i64::MAX),
            file_version: None,
            summary: Some(Summary {
                value: vec![SummaryValue {
                    tag: tag.to_string(),
                    simple_value: Some(value as f32),
                }],
            }),
        })
    }

    fn record(&mut self, event: &Event) -> std::io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())
    }
}

impl<W: Write> EventWriter<std::io::BufWriter<W>> {
    /// Flushes and hands back the underlying writer.
    pub fn finish(self) -> std::io::Result<W> {
        self.out.into_inner().map_err(|e| e.into_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_tfrecord() {
        // CRC-32C check value of "123456789" (RFC 3720).
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        // The masked CRC of an 8-byte length 24, as TensorBoard's reader computes it
        // (tensorboard.compat.tensorflow_stub.pywrap_tensorflow.masked_crc32c).
        assert_eq!(masked_crc(&24u64.to_le_bytes()), 0x224b_7fa3);
    }

    #[test]
    fn records_frame_the_encoded_events() {
        let mut w = EventWriter::new(Vec::new(), 1.5).expect("in memory");
        w.scalar("loss", 10, 0.25).expect("in memory");
        let bytes = w.out;
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) as usize;
            let crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
            assert_eq!(crc, masked_crc(&bytes[at..at + 8]));
            let data = &bytes[at + 12..at + 12 + len];
            let crc = u32::from_le_bytes(
                bytes[at + 12 + len..at + 16 + len]
                    .try_into()
                    .expect("4 bytes"),
            );
            assert_eq!(crc, masked_crc(data));
            events.push(Event::decode(data).expect("an event"));
            at += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        let s = &events[1].summary.as_ref().expect("a summary").value[0];
        assert_eq!(
            (events[1].step, s.tag.as_str(), s.simple_value),
            (10, "loss", Some(0.25))
        );
    }
}
