//! How `segtrain-worker train` shows progress: one JSON object per event (`--json`, what the
//! worker daemon reads), or log lines, with a progress bar when stderr is a terminal.

use super::trainer::{EventSink, TrainEvent};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
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

/// Finite numbers as JSON numbers, others as null (JSON has no NaN).
fn num(v: f64) -> serde_json::Value {
    serde_json::Number::from_f64(v)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

pub fn event_json(ev: &TrainEvent) -> serde_json::Value {
    match ev {
        TrainEvent::Rendezvous {
            tcp_address,
            nccl_unique_id,
        } => {
            use base64::Engine;
            let mut v = json!({"event": "rendezvous"});
            if let Some(a) = tcp_address {
                v["tcp_address"] = json!(a);
            }
            if let Some(id) = nccl_unique_id {
                v["nccl_unique_id"] = json!(base64::engine::general_purpose::STANDARD.encode(id));
            }
            v
        }
        TrainEvent::Collective { backend, detail } => {
            json!({"event": "collective", "backend": backend, "detail": detail})
        }
        TrainEvent::Started {
            start_iteration,
            max_iters,
            train_images,
            val_images,
            device,
            resumed_from,
            parameters,
        } => json!({"event": "started", "start_iteration": start_iteration, "max_iters": max_iters,
            "train_images": train_images, "val_images": val_images, "device": device,
            "resumed_from": resumed_from, "parameters": parameters}),
        TrainEvent::Metrics { iteration, values } => {
            json!({"event": "metrics", "iteration": iteration,
            "values": values.iter().map(|(k, v)| (k.clone(), num(*v))).collect::<serde_json::Map<_, _>>()})
        }
        TrainEvent::RankMetrics { iteration, values } => {
            json!({"event": "rank_metrics", "iteration": iteration,
            "values": values.iter().map(|(k, v)| (k.clone(), num(*v))).collect::<serde_json::Map<_, _>>()})
        }
        TrainEvent::Eval { iteration, result } => json!({"event": "eval", "iteration": iteration,
            "miou": num(result.metrics.miou), "aacc": num(result.metrics.aacc), "loss": num(result.loss),
            "class_iou": result.metrics.class_iou, "images": result.images}),
        TrainEvent::Checkpoint {
            saved,
            uri,
            metrics,
            deleted,
        } => json!({"event": "checkpoint",
            "iteration": saved.iteration, "uri": uri, "bytes": saved.bytes, "sha256": saved.sha256,
            "metrics": metrics.iter().map(|(k, v)| (k.clone(), num(*v))).collect::<serde_json::Map<_, _>>(),
            "deleted": deleted}),
        TrainEvent::Resumed {
            iteration,
            uri,
            skipped,
        } => json!({"event": "resumed", "iteration": iteration, "uri": uri,
            "skipped": skipped.iter().map(|(it, uri, why)| json!({"iteration": it, "uri": uri, "reason": why})).collect::<Vec<_>>()}),
        TrainEvent::CheckpointPending { iteration, uri } => {
            json!({"event": "checkpoint_pending", "iteration": iteration, "uri": uri})
        }
        TrainEvent::Stopped { iteration } => json!({"event": "stopped", "iteration": iteration}),
        TrainEvent::Finished { iteration, best } => {
            json!({"event": "finished", "iteration": iteration,
            "best_miou": best.map(|b| num(b.0)), "best_iteration": best.map(|b| b.1)})
        }
    }
}

impl EventSink for Reporter {
    fn event(&mut self, ev: &TrainEvent) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", event_json(ev));
            let _ = out.flush();
            return;
        }
        match ev {
            TrainEvent::Rendezvous { tcp_address, .. } => match tcp_address {
                Some(a) => self.line(&format!("rank 0 waits for the other ranks on {a}")),
                None => self.line("rank 0 made the NCCL unique id; waiting for the other ranks"),
            },
            TrainEvent::Collective { backend, detail } => {
                self.line(&format!("collective ready: {backend}: {detail}"))
            }
            TrainEvent::Started {
                start_iteration,
                max_iters,
                train_images,
                val_images,
                device,
                resumed_from,
                parameters,
            } => {
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
                    Some(p) => format!(
                        ", resumed from {} at iteration {start_iteration}",
                        p.display()
                    ),
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
