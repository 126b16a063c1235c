//! Printing: tables for people, JSON for scripts.

use comfy_table::{Table, presets::NOTHING};
use serde::Serialize;

use crate::Format;

/// Print `rows` as a table with `header`, or `value` as JSON.
pub fn print<T: Serialize + ?Sized>(
    format: Format,
    value: &T,
    header: &[&str],
    rows: Vec<Vec<String>>,
) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Table => {
            let mut t = Table::new();
            t.load_preset(NOTHING);
            t.set_header(header.iter().map(|h| h.to_uppercase()));
            for r in rows {
                t.add_row(r);
            }
            // comfy-table pads the first column with a space; trim for a
            // kubectl-like left edge.
            for line in t.to_string().lines() {
                println!("{}", line.strip_prefix(' ').unwrap_or(line).trim_end());
            }
        }
    }
    Ok(())
}

/// Print key/value pairs for one object, or the object as JSON.
pub fn print_one<T: Serialize>(format: Format, value: &T, fields: Vec<(&str, String)>) -> anyhow::Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Format::Table => {
            let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, v) in fields {
                println!("{:width$}  {v}", format!("{k}:"), width = width + 1);
            }
        }
    }
    Ok(())
}

pub fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "-".to_owned(), ToString::to_string)
}
