//! Signal reduction, so that a 1 kHz bus does not become 1 kHz of uplink:
//! per signal, send on change, an absolute deadband, a minimum interval and
//! an optional heartbeat.

use std::collections::HashMap;
use std::time::Duration;

use crate::decode::DecodedFrame;
use crate::plan::SignalValue;

/// When a signal's new value is worth sending.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReduceRule {
    /// Send only when the value moved away from the last *sent* value
    /// (beyond `deadband`); `false` sends every sample (still rate-limited
    /// by `min_interval`).
    pub on_change: bool,
    /// Absolute deadband in physical units: a change counts only when
    /// `|new - last_sent| > deadband`. Comparing with the last sent value (not
    /// the last seen one) stops slow drifts from hiding inside the band.
    pub deadband: f64,
    /// Never send a signal more often than this. A change held back by it is
    /// sent with the first sample after the interval, because the value
    /// still differs from the last sent one.
    pub min_interval: Duration,
    /// Send anyway when this long has passed since the last send, so the
    /// cloud can tell "unchanged" from "gone". `None`: never.
    pub max_interval: Option<Duration>,
}

impl Default for ReduceRule {
    /// On change, no deadband, no rate limit, no heartbeat.
    fn default() -> Self {
        Self {
            on_change: true,
            deadband: 0.0,
            min_interval: Duration::ZERO,
            max_interval: None,
        }
    }
}

/// Rules by scope: `signals` keyed `"Message.Signal"`, then `messages` keyed
/// by message name, then `default`.
#[derive(Debug, Clone, Default)]
pub struct ReduceConfig {
    pub default: ReduceRule,
    pub messages: HashMap<String, ReduceRule>,
    pub signals: HashMap<String, ReduceRule>,
}

impl ReduceConfig {
    pub fn rule_for(&self, message: &str, signal: &str) -> ReduceRule {
        self.signals
            .get(&format!("{message}.{signal}"))
            .or_else(|| self.messages.get(message))
            .copied()
            .unwrap_or(self.default)
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    rule: ReduceRule,
    last: Option<(SignalValue, Duration)>,
}

/// Per-signal reduction state for any number of messages.
#[derive(Debug, Clone, Default)]
pub struct Reducer {
    config: ReduceConfig,
    /// Keyed by (id, extended); slots indexed by `DecodedSignal::index`, the
    /// rule resolved once when the signal is first seen.
    state: HashMap<(u32, bool), Vec<Option<Slot>>>,
}

fn changed(old: SignalValue, new: SignalValue, deadband: f64) -> bool {
    match (old, new) {
        (SignalValue::Int(a), SignalValue::Int(b)) => (a.abs_diff(b) as f64) > deadband,
        _ => {
            let (a, b) = (old.as_f64(), new.as_f64());
            if a.is_nan() || b.is_nan() {
                return a.is_nan() != b.is_nan();
            }
            // Equal infinities are no change; inf - inf would be NaN.
            a != b && (a - b).abs() > deadband
        }
    }
}

impl Reducer {
    pub fn new(config: ReduceConfig) -> Self {
        Self {
            config,
            state: HashMap::new(),
        }
    }

    /// Pushes into `out` the positions (in `frame.signals`) of the signals to
    /// send for a frame seen at time `t`, and records them as sent. Time going
    /// backwards (a new log, a clock step) resets the affected signals.
    pub fn filter(&mut self, frame: &DecodedFrame, t: Duration, out: &mut Vec<usize>) {
        let slots = self.state.entry((frame.id, frame.extended)).or_default();
        for (pos, sig) in frame.signals.iter().enumerate() {
            let i = sig.index as usize;
            if slots.len() <= i {
                slots.resize(i + 1, None);
            }
            let slot = slots[i].get_or_insert_with(|| Slot {
                rule: self.config.rule_for(&frame.message, &sig.name),
                last: None,
            });
            let send = match slot.last {
                None => true,
                Some((_, last_t)) if t < last_t => true,
                Some((last_v, last_t)) => {
                    let r = &slot.rule;
                    let elapsed = t - last_t;
                    if elapsed < r.min_interval {
                        false
                    } else if r.max_interval.is_some_and(|m| elapsed >= m) || !r.on_change {
                        true
                    } else {
                        changed(last_v, sig.value, r.deadband)
                    }
                }
            };
            if send {
                slot.last = Some((sig.value, t));
                out.push(pos);
            }
        }
    }

    /// Allocating convenience form of [`Self::filter`].
    pub fn select(&mut self, frame: &DecodedFrame, t: Duration) -> Vec<usize> {
        let mut out = Vec::new();
        self.filter(frame, t, &mut out);
        out
    }

    /// Forgets everything sent so far (e.g. after a reconnect, so the next
    /// frame of every signal is sent).
    pub fn reset(&mut self) {
        self.state.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::DecodedSignal;
    use std::sync::Arc;

    fn frame(values: &[f64]) -> DecodedFrame {
        DecodedFrame {
            id: 1,
            extended: false,
            message: Arc::from("M"),
            signals: values
                .iter()
                .enumerate()
                .map(|(i, v)| DecodedSignal {
                    name: Arc::from(format!("S{i}")),
                    value: SignalValue::Float(*v),
                    unit: Arc::from(""),
                    label: None,
                    raw: 0,
                    index: i as u16,
                })
                .collect(),
        }
    }

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn on_change_with_deadband_compares_to_last_sent() {
        let mut r = Reducer::new(ReduceConfig {
            default: ReduceRule {
                deadband: 1.0,
                ..Default::default()
            },
            ..Default::default()
        });
        assert_eq!(r.select(&frame(&[10.0]), ms(0)), vec![0]);
        assert!(r.select(&frame(&[10.6]), ms(1)).is_empty());
        assert!(r.select(&frame(&[11.0]), ms(2)).is_empty());
        // Drifted 1.2 from the last *sent* value 10.0.
        assert_eq!(r.select(&frame(&[11.2]), ms(3)), vec![0]);
    }

    #[test]
    fn min_interval_holds_back_then_sends_pending_change() {
        let mut cfg = ReduceConfig::default();
        cfg.signals.insert(
            "M.S0".into(),
            ReduceRule {
                min_interval: ms(100),
                ..Default::default()
            },
        );
        let mut r = Reducer::new(cfg);
        assert_eq!(r.select(&frame(&[1.0, 1.0]), ms(0)), vec![0, 1]);
        // S0 changed but is rate limited; S1 (default rule) is unchanged.
        assert!(r.select(&frame(&[2.0, 1.0]), ms(50)).is_empty());
        assert!(r.select(&frame(&[2.0, 1.0]), ms(99)).is_empty());
        assert_eq!(r.select(&frame(&[2.0, 1.0]), ms(100)), vec![0]);
    }

    #[test]
    fn heartbeat_and_every_sample_and_time_reset() {
        let mut cfg = ReduceConfig::default();
        cfg.messages.insert(
            "M".into(),
            ReduceRule {
                max_interval: Some(ms(1000)),
                ..Default::default()
            },
        );
        let mut r = Reducer::new(cfg);
        assert_eq!(r.select(&frame(&[5.0]), ms(0)).len(), 1);
        assert!(r.select(&frame(&[5.0]), ms(999)).is_empty());
        assert_eq!(r.select(&frame(&[5.0]), ms(1000)).len(), 1);
        assert_eq!(r.select(&frame(&[5.0]), ms(10)).len(), 1, "time went back");

        let mut all = Reducer::new(ReduceConfig {
            default: ReduceRule {
                on_change: false,
                min_interval: ms(10),
                ..Default::default()
            },
            ..Default::default()
        });
        let sent: usize = (0..100u64)
            .map(|t| all.select(&frame(&[1.0]), ms(t)).len())
            .sum();
        assert_eq!(sent, 10);
    }

    #[test]
    fn nan_is_a_value() {
        let mut r = Reducer::default();
        assert_eq!(r.select(&frame(&[f64::NAN]), ms(0)).len(), 1);
        assert!(r.select(&frame(&[f64::NAN]), ms(1)).is_empty());
        assert_eq!(r.select(&frame(&[0.0]), ms(2)).len(), 1);
    }
}
