//! Runs per arm, medians, and every ratio.

/// The arms, in the order each round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ArmKind {
    A0,
    A1,
    Rs,
    WKey,
    WPartition,
}

impl ArmKind {
    pub(crate) const ALL: [ArmKind; 5] = [
        ArmKind::A0,
        ArmKind::A1,
        ArmKind::Rs,
        ArmKind::WKey,
        ArmKind::WPartition,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            ArmKind::A0 => "A0 raw rdkafka loop",
            ArmKind::A1 => "A1 hand loop, typed, store_offset",
            ArmKind::Rs => "RS ruststream, Commit::Tracked",
            ArmKind::WKey => "W weir, key order",
            ArmKind::WPartition => "W weir, partition order",
        }
    }
}

/// One table: one configuration in one mode, every arm's runs.
pub(crate) struct Table {
    pub(crate) title: String,
    pub(crate) runs: Vec<(ArmKind, Vec<f64>)>,
}

impl Table {
    pub(crate) fn new(title: String, arms: &[ArmKind]) -> Self {
        Self {
            title,
            runs: arms.iter().map(|&a| (a, Vec::new())).collect(),
        }
    }

    pub(crate) fn push(&mut self, arm: ArmKind, rate: f64) {
        if let Some((_, runs)) = self.runs.iter_mut().find(|(a, _)| *a == arm) {
            runs.push(rate);
        }
    }

    pub(crate) fn median(&self, arm: ArmKind) -> Option<f64> {
        let (_, runs) = self.runs.iter().find(|(a, _)| *a == arm)?;
        (!runs.is_empty()).then(|| median(runs.clone()))
    }

    pub(crate) fn print(&self) {
        println!();
        println!("{}", self.title);
        println!(
            "  {:<36} {:>10}  runs (msgs/s, in round order)",
            "arm", "median"
        );
        for (arm, runs) in &self.runs {
            if runs.is_empty() {
                continue;
            }
            let list: Vec<String> = runs.iter().map(|r| format!("{r:.0}")).collect();
            println!(
                "  {:<36} {:>10.0}  {}",
                arm.label(),
                median(runs.clone()),
                list.join(", ")
            );
        }
        let ratios = [
            ("W key order / RS", ArmKind::WKey, ArmKind::Rs),
            ("W partition order / RS", ArmKind::WPartition, ArmKind::Rs),
            ("W key order / A1", ArmKind::WKey, ArmKind::A1),
            ("W partition order / A1", ArmKind::WPartition, ArmKind::A1),
            ("RS / A1", ArmKind::Rs, ArmKind::A1),
            (
                "W key order / W partition order",
                ArmKind::WKey,
                ArmKind::WPartition,
            ),
            (
                "A1 / A0 (the typed loop against the ceiling)",
                ArmKind::A1,
                ArmKind::A0,
            ),
        ];
        println!("  ratios of medians:");
        for (name, value, of) in ratios {
            if let (Some(v), Some(o)) = (self.median(value), self.median(of)) {
                println!("    {name:<48} {:>6.3}", v / o);
            }
        }
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_takes_the_middle_run() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![5.0]), 5.0);
    }
}
