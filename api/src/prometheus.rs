//! Prometheus text exposition (format 0.0.4), the one writer behind the
//! scheduler's `/metrics` and every agent's: a family's `# HELP`/`# TYPE`
//! lines, then its samples with escaped label values. Members are labelled
//! the same way on both (`namespace`, `pod`, `member`, then `node`), so one
//! query matches either source.

use std::fmt::{Display, Write};

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Type {
    Counter,
    Gauge,
}

/// A `/metrics` answer being written.
#[derive(Default)]
pub struct Exposition {
    text: String,
}

impl Exposition {
    pub fn new() -> Exposition {
        Exposition::default()
    }

    /// Starts a family: its samples follow.
    pub fn family(&mut self, name: &str, ty: Type, help: &str) -> &mut Self {
        let ty = match ty {
            Type::Counter => "counter",
            Type::Gauge => "gauge",
        };
        let _ = writeln!(self.text, "# HELP {name} {help}\n# TYPE {name} {ty}");
        self
    }

    /// One sample: `name{k="v",…} value`.
    pub fn sample(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        value: impl Display,
    ) -> &mut Self {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{k}=\"{}\"", escape(v));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {value}");
        self
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// A label value as the format writes it: `\`, `"` and newlines escaped.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// CPU seconds from nanoseconds, with microsecond precision.
pub struct Seconds(pub u64);

impl Display for Seconds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.6}", self.0 as f64 / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_and_samples_in_the_text_format() {
        let mut e = Exposition::new();
        e.family("x_total", Type::Counter, "Things.")
            .sample(
                "x_total",
                &[("pod", "a\"b\\c\nd"), ("node", "n")],
                Seconds(1_500_000),
            )
            .family("up", Type::Gauge, "Up.")
            .sample("up", &[], 1);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{pod=\"a\\\"b\\\\c\\nd\",node=\"n\"} 0.001500\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
