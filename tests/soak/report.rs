//! The report as Markdown (the JSON is the checker's `Report` serialized as is).

use crate::checker::Report;
use std::fmt::Write as _;

fn opt(v: Option<f64>) -> String {
    v.map_or("not drained".to_owned(), |s| format!("{s:.1} s"))
}

pub(crate) fn markdown(r: &Report) -> String {
    let mut md = String::new();
    let verdict = if r.passed { "PASSED" } else { "FAILED" };
    let _ = writeln!(md, "# Weir soak report: {verdict}\n");
    let _ = writeln!(
        md,
        "Seed {}, {} min at {} records/s, started {}.\n\nCommand: `{}`\n",
        r.seed, r.minutes, r.rate, r.started_at, r.command
    );
    let _ = writeln!(md, "Broker: {}. Database: {}.\n", r.broker, r.database);
    if !r.failures.is_empty() {
        let _ = writeln!(md, "## Failures\n");
        for f in &r.failures {
            let _ = writeln!(md, "- {f}");
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(md, "![timeline]({})\n", r.picture);
    let _ = writeln!(md, "## Figures\n");
    let _ = writeln!(md, "| figure | value |\n|---|---|");
    let d = &r.dead_lettered;
    let rows = [
        (
            "produced (acknowledged by the broker)",
            r.produced.to_string(),
        ),
        ("handled (unique)", r.handled_unique.to_string()),
        ("**lost**", r.lost.to_string()),
        (
            "lost on a partition with a broker fault",
            r.lost_on_broker_fault.to_string(),
        ),
        ("**order_violations**", r.order_violations.to_string()),
        (
            "duplicate handlings (records handled more than once)",
            format!("{} ({})", r.duplicates.count, r.duplicates.records),
        ),
        (
            "poison set (undecodable + failing forever)",
            format!(
                "{} ({} + {})",
                d.poison, d.poison_undecodable, d.poison_permanent
            ),
        ),
        (
            "dead-lettered from the poison set / missing / unexpected / repeated",
            format!(
                "{} / {} / {} / {}",
                d.matched,
                d.missing.len(),
                d.unexpected.len(),
                d.repeated
            ),
        ),
        ("parked at the end", r.parked_at_end.to_string()),
        (
            "tasks created through the API / handled / completed / failed / unfinished",
            format!(
                "{} / {} / {} / {} / {}",
                r.tasks.created,
                r.tasks.handled,
                r.tasks.completed,
                r.tasks.failed,
                r.tasks.unfinished
            ),
        ),
        (
            "end-to-end latency p50 / p99 / max",
            format!(
                "{} / {} / {} ms",
                r.latency.p50_ms, r.latency.p99_ms, r.latency.max_ms
            ),
        ),
        (
            "the same without the outage's records",
            format!(
                "{} / {} / {} ms",
                r.latency_excluding_outage.p50_ms,
                r.latency_excluding_outage.p99_ms,
                r.latency_excluding_outage.max_ms
            ),
        ),
        ("maximum total lag", format!("{} records", r.max_lag)),
        (
            "drain after the stream ended",
            format!("{:.1} s", r.drain_at_end_s),
        ),
        ("broker faults", r.broker_faults.len().to_string()),
        (
            "unexpected process exits",
            r.unexpected_exits.len().to_string(),
        ),
        ("garbled ledger lines", r.garbled_ledger_lines.to_string()),
    ];
    for (k, v) in rows {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "\n## Faults\n");
    let _ = writeln!(
        md,
        "| kind | planned | started | ended | broker | max lag | drain | duplicates | note |\n|---|---|---|---|---|---|---|---|---|"
    );
    for f in &r.faults {
        let _ = writeln!(
            md,
            "| {} | {:.1} s | {:.1} s | {:.1} s | {} | {} | {} | {} | {} |",
            f.kind.label(),
            f.planned_s,
            f.start_s,
            f.end_s,
            f.broker,
            f.max_lag,
            opt(f.drain_s),
            f.duplicates,
            f.note
        );
    }
    if !r.faults_left_out.is_empty() {
        let _ = writeln!(md, "\nLeft out:\n");
        for f in &r.faults_left_out {
            let _ = writeln!(md, "- {f}");
        }
    }
    let _ = writeln!(md, "\n## Duplicates by fault\n");
    let _ = writeln!(md, "| fault | duplicate handlings |\n|---|---|");
    for (k, v) in &r.duplicates.by_fault {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md, "\n## Broker faults\n");
    if r.broker_faults.is_empty() {
        let _ = writeln!(
            md,
            "None: no partition was without a live owner for longer than two session timeouts."
        );
    }
    for b in &r.broker_faults {
        let _ = writeln!(
            md,
            "- partition {} without a live owner from {:.1} s (detected {:.1} s, owned again {}), {} records waiting; last owner {:?}; rebalances asked at {:?}",
            b.partition,
            b.unowned_from_s,
            b.detected_s,
            b.ended_s.map_or("never".to_owned(), |e| format!("{e:.1} s")),
            b.backlog,
            b.last_owner,
            b.remedies_s.iter().map(|s| format!("{s:.1} s")).collect::<Vec<_>>()
        );
    }
    let _ = writeln!(md, "\n## Peak memory (VmHWM)\n");
    let _ = writeln!(md, "| process | peak RSS |\n|---|---|");
    for (name, kib) in &r.peak_rss_kib {
        let _ = writeln!(md, "| {name} | {:.1} MiB |", *kib as f64 / 1024.0);
    }
    let samples = |title: &str, items: &[String]| {
        let mut s = String::new();
        if !items.is_empty() {
            let _ = writeln!(s, "\n## {title} (first {})\n", items.len().min(20));
            for i in items.iter().take(20) {
                let _ = writeln!(s, "- {i}");
            }
        }
        s
    };
    md.push_str(&samples("Lost", &r.lost_sample));
    md.push_str(&samples("Order violations", &r.order_violation_sample));
    md.push_str(&samples("Missing dead letters", &d.missing));
    md.push_str(&samples("Unexpected dead letters", &d.unexpected));
    md.push_str(&samples("Unexpected exits", &r.unexpected_exits));
    md.push_str(&samples("Tasks never handled", &r.tasks.lost));
    md
}
