//! How `segtrain-worker train` shows progress: one [`TrainerLine`] per event (`--json`, what the
//! worker daemon reads), or log lines, with a progress bar when stderr is a terminal.

use super::events::{CollectiveReady, EventSink, RunStart, TrainEvent};
use indicatif::{ProgressBar, ProgressStyle};
use segtrain_wire::{self as wire, Real, TrainerLine};
use std::io::{IsTerminal, Write};

pub struct Reporter {
    json: bool,
    bar: Option<ProgressBar>,
}

impl Reporter {
    pub fn new(json: bool) -> Reporter {
        Reporter { json, bar: None }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
}

fn reals(values: &std::collections::BTreeMap<String, f64>) -> wire::Values {
    values.iter().map(|(k, v)| (k.clone(), Real(*v))).collect()
}

/// The wire form of an event (what `--json` prints, one line each).
pub fn event_line(ev: &TrainEvent) -> TrainerLine {
    match ev {
        TrainEvent::Rendezvous {
            tcp_address,
            nccl_unique_id,
        } => {
            use base64::Engine;
            TrainerLine::Rendezvous {
                tcp_address: tcp_address.clone(),
                nccl_unique_id: nccl_unique_id
                    .as_ref()
                    .map(|id| base64::engine::general_purpose::STANDARD.encode(id)),
            }
        }
        TrainEvent::Collective(ready) => TrainerLine::Collective(ready.clone()),
        TrainEvent::Started(start) => TrainerLine::Started(start.clone()),
        TrainEvent::Metrics { iteration, values } => TrainerLine::Metrics {
            iteration: *iteration,
            values: reals(values),
        },
        TrainEvent::RankMetrics { iteration, values } => TrainerLine::RankMetrics {
            iteration: *iteration,
            values: reals(values),
        },
        TrainEvent::Eval { iteration, result } => TrainerLine::Eval {
            iteration: *iteration,
            miou: Real(result.metrics.miou),
            aacc: Real(result.metrics.aacc),
            loss: Real(result.loss),
            class_iou: result
                .metrics
                .class_iou
                .iter()
                .map(|v| Real(v.unwrap_or(f64::NAN)))
                .collect(),
            images: result.images as u64,
        },
        TrainEvent::Checkpoint {
            saved,
            uri,
            metrics,
            deleted,
            on_stop,
        } => TrainerLine::Checkpoint {
            iteration: saved.iteration,
            uri: uri.clone(),
            bytes: saved.bytes,
            sha256: saved.sha256.clone(),
            metrics: reals(metrics),
            deleted: deleted.clone(),
            on_stop: *on_stop,
        },
        TrainEvent::Resumed {
            iteration,
            uri,
            skipped,
        } => TrainerLine::Resumed {
            iteration: *iteration,
            uri: uri.clone(),
            skipped: skipped
                .iter()
                .map(|(it, uri, why)| wire::Skipped {
                    iteration: *it,
                    uri: uri.clone(),
                    reason: why.clone(),
                })
                .collect(),
        },
        TrainEvent::CheckpointPending { iteration, uri } => TrainerLine::CheckpointPending {
            iteration: *iteration,
            uri: uri.clone(),
        },
        TrainEvent::Stopped { iteration } => TrainerLine::Stopped {
            iteration: *iteration,
        },
        TrainEvent::Finished { iteration, best } => TrainerLine::Finished {
            iteration: *iteration,
            best_miou: best.map(|b| Real(b.0)),
            best_iteration: best.map(|b| b.1),
        },
    }
}

impl EventSink for Reporter {
    fn event(&mut self, ev: &TrainEvent) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", event_line(ev).to_line());
            let _ = out.flush();
            return;
        }
        match ev {
            TrainEvent::Rendezvous { tcp_address, .. } => match tcp_address {
                Some(a) => self.line(&format!("rank 0 waits for the other ranks on {a}")),
                None => self.line("rank 0 made the NCCL unique id; waiting for the other ranks"),
            },
            TrainEvent::Collective(CollectiveReady { backend, detail }) => {
                self.line(&format!("collective ready: {backend}: {detail}"))
            }
            TrainEvent::Started(RunStart {
                start_iteration,
                max_iters,
                train_images,
                val_images,
                device,
                resumed_from,
                parameters,
            }) => {
                if std::io::stderr().is_terminal() {
                    let bar = ProgressBar::new(*max_iters);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{bar:30} {pos}/{len} iters  eta {eta}  {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_position(*start_iteration);
                    self.bar = Some(bar);
                }
                let from = match resumed_from {
                    Some(p) => format!(", resumed from {p} at iteration {start_iteration}"),
                    None => String::new(),
                };
                self.line(&format!(
                    "training on {device}: {parameters} parameters, {train_images} train / {val_images} val images, {max_iters} iterations{from}"
                ));
            }
            TrainEvent::Metrics { iteration, values } => {
                let g = |k: &str| values.get(k).copied().unwrap_or(f64::NAN);
                let msg = format!(
                    "loss {:.4}  lr {:.2e}  {:.1} img/s  data-wait {:.1} ms  step {:.0} ms",
                    g("loss"),
                    g("lr"),
                    g("images_per_s"),
                    g("data_wait_ms"),
                    g("step_ms")
                );
                match &self.bar {
                    Some(b) => {
                        b.set_position(*iteration);
                        b.set_message(msg);
                    }
                    None => eprintln!("iter {iteration:>7}  {msg}"),
                }
            }
            TrainEvent::Eval { iteration, result } => {
                self.line(&format!(
                "eval at iter {iteration}: mIoU {:.2}%  aAcc {:.2}%  val loss {:.4} ({} images)",
                100.0 * result.metrics.miou, 100.0 * result.metrics.aacc, result.loss, result.images
            ))
            }
            TrainEvent::Checkpoint {
                saved,
                uri,
                deleted,
                ..
            } => {
                self.line(&format!("checkpoint {uri} ({} bytes)", saved.bytes));
                for d in deleted {
                    self.line(&format!("deleted old checkpoint {d}"));
                }
            }
            TrainEvent::Resumed {
                iteration,
                uri,
                skipped,
            } => {
                for (it, uri, why) in skipped {
                    self.line(&format!(
                        "skipped the checkpoint of iteration {it} ({uri}): {why}"
                    ));
                }
                self.line(&format!("resuming from {uri} at iteration {iteration}"));
            }
            TrainEvent::CheckpointPending { .. } | TrainEvent::RankMetrics { .. } => {}
            TrainEvent::Stopped { iteration } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                eprintln!(
                    "stopped on request after iteration {iteration}; resume with --resume-from \
                     (the last checkpoint)"
                );
            }
            TrainEvent::Finished { iteration, best } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                let best = best.map_or(String::new(), |(m, i)| {
                    format!("; best mIoU {:.2}% at iteration {i}", 100.0 * m)
                });
                eprintln!("finished at iteration {iteration}{best}");
            }
        }
    }
}
