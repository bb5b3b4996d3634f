//! Device ids from MQTT topics.

/// A compiled `deviceFromTopic` pattern such as `devices/{device}/telemetry`:
/// levels match one to one, `+` matches any level, `{device}` captures.
#[derive(Debug, Clone)]
pub struct DevicePattern {
    levels: Vec<Level>,
}

#[derive(Debug, Clone, PartialEq)]
enum Level {
    Literal(String),
    Any,
    Device,
}

impl DevicePattern {
    pub fn new(pattern: &str) -> Self {
        let levels = pattern
            .split('/')
            .map(|level| match level {
                "{device}" => Level::Device,
                "+" => Level::Any,
                other => Level::Literal(other.to_string()),
            })
            .collect();
        Self { levels }
    }

    /// The device a topic names, or `None` if the topic does not fit.
    pub fn device<'t>(&self, topic: &'t str) -> Option<&'t str> {
        let mut device = None;
        let mut parts = topic.split('/');
        for level in &self.levels {
            let part = parts.next()?;
            match level {
                Level::Literal(lit) if lit != part => return None,
                Level::Device => device = Some(part),
                _ => {}
            }
        }
        if parts.next().is_some() {
            return None;
        }
        device.filter(|d| !d.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::DevicePattern;

    #[test]
    fn captures_the_device_level_only_on_a_full_match() {
        let p = DevicePattern::new("devices/{device}/telemetry");
        assert_eq!(p.device("devices/pump-7/telemetry"), Some("pump-7"));
        assert_eq!(p.device("devices/pump-7/status"), None);
        assert_eq!(p.device("devices/pump-7/telemetry/extra"), None);
        assert_eq!(p.device("devices//telemetry"), None);
        let p = DevicePattern::new("site/+/{device}");
        assert_eq!(p.device("site/a/d1"), Some("d1"));
    }
}
