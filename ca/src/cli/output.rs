//! Printing shared by every verb: the output format and lists.

use clap::ValueEnum;
use serde_json::Value;

/// Output format of every verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// Prints a list: a JSON array, or a count and each item.
pub(super) fn print_list<T>(
    items: &[T],
    noun: &str,
    to_json: fn(&T) -> Value,
    print: fn(&T, Output),
    out: Output,
) {
    match out {
        Output::Json => println!(
            "{}",
            Value::from(items.iter().map(to_json).collect::<Vec<_>>())
        ),
        Output::Text => {
            println!("Found {} {noun}", items.len());
            for i in items {
                print(i, out);
            }
        }
    }
}

// Times and durations are spelled as the agent's CLI spells them; every value from
// elsewhere (what agents, workloads, peers, other admins or the database hold) is
// written through `shown`, in text output only: JSON keeps it exact, escaped as JSON.
pub(crate) use ztid_human::{duration, expiry, rfc3339, shown, shown_string, when};
