//! The one progress bar of every long job (evaluation windows, quantized layers and
//! blocks): the same layout everywhere, hidden when the caller asks for quiet.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` `unit`s (e.g. "windows", "blocks") named `label` (its prefix); callers
/// put running figures in its message. Hidden unless `show`.
pub fn progress_bar(show: bool, len: usize, unit: &str, label: &str) -> ProgressBar {
    let bar = if show {
        ProgressBar::new(len as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{elapsed_precise}} ETA {{eta}} {{msg}}"
        ))
        .expect("the template is fixed: only the unit word varies")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}
