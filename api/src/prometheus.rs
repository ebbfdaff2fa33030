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
    Histogram,
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
            Type::Histogram => "histogram",
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

    /// One histogram's samples (its family started as
    /// [`Type::Histogram`]): cumulative `_bucket`s by `le` in seconds from
    /// per-bucket `counts` (as [`crate::latency::Histogram`] keeps them),
    /// then `_sum` and `_count`.
    pub fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        counts: &[u64],
        sum_us: u64,
    ) -> &mut Self {
        let bucket = format!("{name}_bucket");
        let mut seen = 0u64;
        for (i, n) in counts.iter().enumerate() {
            seen += n;
            let le = match crate::latency::BOUNDS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            let mut l = labels.to_vec();
            l.push(("le", &le));
            self.sample(&bucket, &l, seen);
        }
        self.sample(
            &format!("{name}_sum"),
            labels,
            format!("{:.6}", sum_us as f64 / 1e6),
        );
        self.sample(&format!("{name}_count"), labels, seen)
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// One running member's figures, as the scheduler's and the agents'
/// `/metrics` both write them.
pub struct MemberRow<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub member: &'a str,
    pub node: &'a str,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
}

impl Exposition {
    /// The two member families, `flotilla_member_cpu_seconds_total` and
    /// `flotilla_member_memory_bytes`, one sample per row each.
    pub fn members(&mut self, rows: &[MemberRow<'_>]) -> &mut Self {
        fn labels<'a>(r: &MemberRow<'a>) -> [(&'static str, &'a str); 4] {
            [
                ("namespace", r.namespace),
                ("pod", r.pod),
                ("member", r.member),
                ("node", r.node),
            ]
        }
        self.family(
            "flotilla_member_cpu_seconds_total",
            Type::Counter,
            "CPU time of the member's current run.",
        );
        for r in rows {
            let v = format!("{:.6}", r.cpu_seconds);
            self.sample("flotilla_member_cpu_seconds_total", &labels(r), v);
        }
        self.family(
            "flotilla_member_memory_bytes",
            Type::Gauge,
            "A member's memory now: its linear memories (wasm) or its cgroup's working set (containers).",
        );
        for r in rows {
            self.sample("flotilla_member_memory_bytes", &labels(r), r.memory_bytes);
        }
        self
    }
}

/// A label value as the format writes it: `\`, `"` and newlines escaped.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
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
                "0.001500",
            )
            .family("up", Type::Gauge, "Up.")
            .sample("up", &[], 1);
        assert_eq!(
            e.finish(),
            "# HELP x_total Things.\n# TYPE x_total counter\nx_total{pod=\"a\\\"b\\\\c\\nd\",node=\"n\"} 0.001500\n# HELP up Up.\n# TYPE up gauge\nup 1\n"
        );
    }
}
