//! The PNG chart: catch-up reads per follow-up turn and catch-up p99 per mode, side by side.
//!
//! Text needs a TrueType font; plotters' `ab_glyph` backend takes the bytes of one, so the
//! chart does not depend on a system font lookup. Without the font the bars are still drawn,
//! without labels.

use std::path::Path;

use plotters::prelude::*;

use crate::report::RunResult;
use crate::{BenchError, Result};

/// The font the chart uses (Debian's `fonts-dejavu-core`).
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const MODES: [&str; 3] = ["baseline", "coderd-cache", "chatcache"];
const COLORS: [RGBColor; 3] = [
    RGBColor(200, 80, 60),
    RGBColor(230, 160, 40),
    RGBColor(50, 130, 190),
];

/// Makes sure the font is there: installs `fonts-dejavu-core` with apt when it is missing and
/// we may. Returns whether text can be drawn.
pub fn ensure_font() -> bool {
    if Path::new(FONT_PATH).exists() {
        return register();
    }
    println!("chart: {FONT_PATH} missing; installing fonts-dejavu-core with apt-get");
    let quiet = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let installed = quiet(&["install", "-y", "-q", "fonts-dejavu-core"])
        || (quiet(&["update", "-q"]) && quiet(&["install", "-y", "-q", "fonts-dejavu-core"]));
    if !installed || !Path::new(FONT_PATH).exists() {
        println!("chart: no font available; the PNG will have bars but no text");
        return false;
    }
    register()
}

fn register() -> bool {
    let Ok(bytes) = std::fs::read(FONT_PATH) else {
        return false;
    };
    // plotters keeps fonts for the life of the process; so does this one leaked buffer.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

/// Draws the chart into `path`.
pub fn draw(result: &RunResult, path: &Path, with_text: bool) -> Result<()> {
    let fail = |e: String| BenchError::Step(format!("chart {}: {e}", path.display()));
    let root = BitMapBackend::new(path, (1200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
    let root = if with_text {
        let title = format!(
            "chatcache scaletest: {} chats x {} turns, {} replicas, {} subscribers/chat",
            result.params.chats,
            result.params.turns,
            result.params.replicas,
            result.params.subscribers_per_chat
        );
        root.titled(&title, ("sans-serif", 24))
            .map_err(|e| fail(e.to_string()))?
    } else {
        root
    };
    let (left, right) = root.split_horizontally(600);

    let reads: Vec<Option<f64>> = MODES
        .iter()
        .map(|m| result.modes.get(*m).map(|r| r.catchup_reads_per_turn))
        .collect();
    let p99: Vec<Option<f64>> = MODES
        .iter()
        .map(|m| result.modes.get(*m).and_then(|r| r.catchup_p99_ms))
        .collect();
    // A mode that broke the no-loss promise says so above its bars.
    let faults: Vec<Option<String>> = MODES
        .iter()
        .map(|m| {
            result
                .modes
                .get(*m)
                .map(|r| r.verdict.clone())
                .filter(|v| v != "ok")
        })
        .collect();
    let reads_title = "catch-up reads per follow-up turn";
    panel(&left, reads_title, &reads, &faults, with_text).map_err(|e| fail(e.to_string()))?;
    let p99_title = "catch-up p99 (ms)";
    panel(&right, p99_title, &p99, &faults, with_text).map_err(|e| fail(e.to_string()))?;
    root.present().map_err(|e| fail(e.to_string()))?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// One bar per mode; a missing value leaves its slot empty.
fn panel(
    area: &Area<'_>,
    title: &str,
    values: &[Option<f64>],
    faults: &[Option<String>],
    with_text: bool,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let top = values.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
    let y_max = if top > 0.0 { top * 1.35 } else { 1.0 };
    let mut builder = ChartBuilder::on(area);
    builder.margin(20);
    if with_text {
        builder
            .caption(title, ("sans-serif", 20))
            .x_label_area_size(35)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(-0.5f64..2.5f64, 0f64..y_max)?;
    if with_text {
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(3)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && (0.0..3.0).contains(&i) {
                    MODES[i as usize].to_owned()
                } else {
                    String::new()
                }
            })
            .label_style(("sans-serif", 15))
            .draw()?;
    }

    for (i, value) in values.iter().enumerate() {
        let Some(value) = value else { continue };
        let x = i as f64;
        chart.draw_series(std::iter::once(Rectangle::new(
            [(x - 0.3, 0.0), (x + 0.3, *value)],
            COLORS[i].filled(),
        )))?;
        if with_text {
            let label = if *value >= 100.0 {
                format!("{value:.0}")
            } else {
                format!("{value:.2}")
            };
            chart.draw_series(std::iter::once(Text::new(
                label,
                (x - 0.12, value + y_max * 0.07),
                ("sans-serif", 16).into_font(),
            )))?;
            if let Some(fault) = &faults[i] {
                let style = ("sans-serif", 14).into_font().color(&RGBColor(170, 0, 0));
                let lines: Vec<&str> = fault.split(", ").collect();
                for (line, text) in lines.iter().enumerate() {
                    let above = (lines.len() - 1 - line) as f64;
                    let y = value + y_max * (0.16 + 0.05 * above);
                    chart.draw_series(std::iter::once(Text::new(
                        text.to_string(),
                        (x - 0.3, y),
                        style.clone(),
                    )))?;
                }
            }
        }
    }
    Ok(())
}
