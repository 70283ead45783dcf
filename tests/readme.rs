//! The README's promises about itself: its quotes of `examples/orders-service` are the files,
//! byte for byte, and every fenced block says its language (so each Rust one is compiled by
//! `cargo test --doc`, which includes the README, and none is skipped with `ignore`).

use std::path::Path;

/// A fenced block of the README: the line its fence opens on, the info string after the
/// backticks, and the lines between the fences.
#[derive(Debug)]
struct Block {
    line: usize,
    info: String,
    lines: Vec<String>,
    /// The path named by a `<!-- quote: PATH -->` line just before the fence, if any.
    quotes: Option<String>,
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md is readable")
}

/// Splits markdown into its fenced blocks. A fence is a line of three or more backticks,
/// indented or not (blocks inside list items count too); it closes on a line of at least as
/// many backticks and nothing else.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut open: Option<(usize, Block)> = None;
    let mut last_quote: Option<(usize, String)> = None;
    for (index, raw) in markdown.lines().enumerate() {
        let number = index + 1;
        let trimmed = raw.trim_start();
        let ticks = trimmed.chars().take_while(|&c| c == '`').count();
        match open.take() {
            Some((fence, block)) if ticks >= fence && trimmed[ticks..].trim().is_empty() => {
                out.push(block);
            }
            Some((fence, mut block)) => {
                block.lines.push(raw.to_owned());
                open = Some((fence, block));
            }
            None if ticks >= 3 => {
                let quotes = last_quote
                    .take()
                    .filter(|(at, _)| *at + 1 == number)
                    .map(|(_, path)| path);
                open = Some((
                    ticks,
                    Block {
                        line: number,
                        info: trimmed[ticks..].trim().to_owned(),
                        lines: Vec::new(),
                        quotes,
                    },
                ));
            }
            None => {
                if let Some(path) = trimmed
                    .strip_prefix("<!-- quote:")
                    .and_then(|rest| rest.strip_suffix("-->"))
                {
                    last_quote = Some((number, path.trim().to_owned()));
                }
            }
        }
    }
    assert!(open.is_none(), "the README ends inside a fenced block");
    out
}

/// Whether rustdoc hides this line of a Rust block (`# ` prefix, or `#` alone).
fn hidden(line: &str) -> bool {
    let trimmed = line.trim_start();
    trimmed == "#" || trimmed.starts_with("# ")
}

fn is_rust(info: &str) -> bool {
    info.split(',').next().map(str::trim) == Some("rust")
}

/// What a reader sees of a block: for Rust, the lines rustdoc does not hide.
fn visible(block: &Block) -> String {
    let mut text = String::new();
    for line in &block.lines {
        if is_rust(&block.info) && hidden(line) {
            continue;
        }
        text.push_str(line);
        text.push('\n');
    }
    text
}

#[test]
fn the_readme_quotes_the_example_service_byte_for_byte() {
    let readme = readme();
    let quotes: Vec<Block> = blocks(&readme)
        .into_iter()
        .filter(|b| b.quotes.is_some())
        .collect();
    let quoted: Vec<&str> = quotes.iter().filter_map(|b| b.quotes.as_deref()).collect();
    for wanted in [
        "examples/orders-service/Cargo.toml",
        "examples/orders-service/src/lib.rs",
        "examples/orders-service/src/main.rs",
    ] {
        assert!(
            quoted.contains(&wanted),
            "the README quotes {wanted} (a `<!-- quote: {wanted} -->` line before its block); it quotes {quoted:?}"
        );
    }
    for block in &quotes {
        let path = block.quotes.as_deref().unwrap_or_default();
        let file = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
            .unwrap_or_else(|e| panic!("README line {}: cannot read {path}: {e}", block.line));
        if is_rust(&block.info) {
            // Hidden lines are how the quote compiles; a file line rustdoc would hide could
            // differ unseen, so the file must have none.
            assert!(
                !file.lines().any(hidden),
                "{path} has a line rustdoc would hide in the README's quote"
            );
        }
        let shown = visible(block);
        if shown != file {
            let first = shown
                .lines()
                .zip(file.lines())
                .position(|(a, b)| a != b)
                .unwrap_or_else(|| shown.lines().count().min(file.lines().count()));
            panic!(
                "README line {}: the quote of {path} differs from the file at its line {}:\n  README: {:?}\n  file:   {:?}",
                block.line,
                first + 1,
                shown.lines().nth(first),
                file.lines().nth(first),
            );
        }
    }
}

#[test]
fn every_fenced_block_of_the_readme_says_its_language() {
    let blocks = blocks(&readme());
    assert!(blocks.len() > 10, "found only {} blocks", blocks.len());
    let untagged: Vec<usize> = blocks
        .iter()
        .filter(|b| b.info.is_empty())
        .map(|b| b.line)
        .collect();
    assert!(
        untagged.is_empty(),
        "fenced blocks without a language (```rust, ```toml, ```sh, ```text ...) at README lines {untagged:?}"
    );
    let skipped: Vec<(usize, &str)> = blocks
        .iter()
        .filter(|b| is_rust(&b.info) && b.info.split(',').any(|a| a.trim() == "ignore"))
        .map(|b| (b.line, b.info.as_str()))
        .collect();
    assert!(
        skipped.is_empty(),
        "Rust blocks that `cargo test --doc` would not compile: {skipped:?}"
    );
}

#[test]
fn the_parser_finds_fences_inside_list_items_and_quote_markers() {
    let text =
        "<!-- quote: a.rs -->\n```rust\n# hidden\nshown\n```\n\n- item\n\n  ```\n  x\n  ```\n";
    let found = blocks(text);
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].quotes.as_deref(), Some("a.rs"));
    assert_eq!(visible(&found[0]), "shown\n");
    assert_eq!(found[1].info, "");
    assert_eq!(found[1].line, 9);
}
