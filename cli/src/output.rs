//! What the CLI prints: aligned text for people, one JSON document per command with `--json`.

use segtrain_proto::json::{
    self, attempt_state, checkpoint_state, role_name, sorted, state_name, time, worker_state_name,
};
pub use segtrain_proto::json::{worker_name, JobView};
use segtrain_proto::v1 as pb;
use serde::Serialize;
use serde_json::{json, Value};

/// `iteration / max_iters`, and how far an earlier attempt got when that is further (the
/// iterations in between run again after a restart).
fn progress(j: &JobView) -> String {
    let mut s = format!("{} / {}", j.iteration, j.max_iters);
    if j.furthest_iteration > j.iteration {
        s.push_str(&format!(
            " (an earlier attempt reached {})",
            j.furthest_iteration
        ));
    }
    s
}

/// The spec's world size, and the current attempt's when it runs with fewer ranks.
fn world(j: &JobView) -> String {
    if j.attempt_world_size == 0 || j.attempt_world_size == j.world_size {
        return j.world_size.to_string();
    }
    format!(
        "{} of {} (elastic: accumulate_steps {})",
        j.attempt_world_size, j.world_size, j.attempt_accumulate_steps
    )
}

pub struct Printer {
    pub json: bool,
}

fn print_json(v: &impl Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{}", segtrain_proto::text::json_safe(&s)),
        Err(e) => say_err!("error: cannot encode JSON: {e}"),
    }
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        say!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

impl Printer {
    /// The `warnings` go to stderr (as `warning: ...`) from the caller; `--json` also carries them.
    pub fn submitted(&self, j: &JobView, existing: bool, warnings: &[String]) {
        if self.json {
            print_json(&json!({ "job": j, "existing": existing, "warnings": warnings }));
        } else if existing {
            say!(
                "job {} already exists for this idempotency key ({})",
                j.id,
                j.state
            );
        } else {
            say!(
                "submitted job {} ({}, {} on {} rank(s), {} iterations)",
                j.id,
                j.name,
                j.variant,
                j.world_size,
                j.max_iters
            );
        }
    }

    pub fn canceled(&self, j: &JobView) {
        if self.json {
            print_json(j);
        } else {
            say!("job {} is {}", j.id, j.state);
        }
    }

    pub fn job(&self, j: &JobView) {
        if self.json {
            print_json(j);
            return;
        }
        let rows = [
            ("id", j.id.clone()),
            ("name", j.name.clone()),
            ("state", j.state.clone()),
            ("variant", j.variant.clone()),
            ("world size", world(j)),
            ("iteration", progress(j)),
            ("attempt", j.attempt.to_string()),
            ("restarts", format!("{} of {}", j.restarts, j.max_restarts)),
            ("preemptions", j.preemptions.to_string()),
            (
                "resumed at",
                j.resumed_from_iteration
                    .map(|i| format!("iteration {i}"))
                    .unwrap_or_default(),
            ),
            ("reason", j.reason.clone()),
            ("owner", owner(j)),
            ("created", j.created_at.clone()),
            ("updated", j.updated_at.clone()),
            ("finished", j.finished_at.clone().unwrap_or_default()),
        ];
        for (k, v) in rows {
            if !v.is_empty() {
                say!("{k:<11} {v}");
            }
        }
    }

    pub fn job_list(&self, jobs: &[JobView], next: &str) {
        if self.json {
            print_json(&json!({ "jobs": jobs, "next_page_token": next }));
            return;
        }
        if jobs.is_empty() {
            say!("no jobs");
            return;
        }
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.name.clone(),
                    j.state.clone(),
                    j.variant.clone(),
                    j.world_size.to_string(),
                    format!("{}/{}", j.iteration, j.max_iters),
                    owner(j),
                    j.created_at.clone(),
                ]
            })
            .collect();
        table(
            &[
                "ID", "NAME", "STATE", "VARIANT", "RANKS", "ITER", "OWNER", "CREATED",
            ],
            &rows,
        );
        if !next.is_empty() {
            say!("more: segtrain list --page-token {next}");
        }
    }

    pub fn finished(&self, j: &JobView) {
        if !self.json {
            let why = if j.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", j.reason)
            };
            say!("job {} finished {}{}", j.id, j.state, why);
        }
    }

    pub fn event(&self, ev: &pb::JobEvent) {
        use pb::job_event::Payload;
        if self.json {
            // One JSON object per line, so the stream can be piped.
            match serde_json::to_string(&json::event(ev)) {
                Ok(s) => println!("{}", segtrain_proto::text::json_safe(&s)),
                Err(e) => say_err!("error: cannot encode JSON: {e}"),
            }
            return;
        }
        let head = format!("{} #{:<6}", time(&ev.time), ev.id);
        match &ev.payload {
            Some(Payload::StateChange(c)) => {
                let from = if c.from == 0 {
                    "-".to_string()
                } else {
                    state_name(c.from)
                };
                let why = if c.reason.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", c.reason)
                };
                say!("{head} state {from} -> {}{why}", state_name(c.to));
            }
            Some(Payload::Metrics(m)) => {
                let vals: Vec<String> = sorted(&m.values)
                    .iter()
                    .map(|(k, v)| format!("{k}={}", fmt_num(*v)))
                    .collect();
                say!("{head} iter {:>7}  {}", m.iteration, vals.join("  "));
            }
            Some(Payload::Eval(e)) => {
                say!(
                    "{head} eval at iter {}: mIoU {:.2}%  aAcc {:.2}%  loss {:.4}",
                    e.iteration,
                    100.0 * e.miou,
                    100.0 * e.aacc,
                    e.loss
                );
            }
            Some(Payload::Checkpoint(c)) => {
                if let Some(c) = &c.checkpoint {
                    say!(
                        "{head} checkpoint at iter {}: {} ({} bytes)",
                        c.iteration,
                        c.uri,
                        c.bytes
                    );
                }
            }
            Some(Payload::Note(n)) => say!("{head} note: {}", n.text),
            None => say!("{head} (empty event)"),
        }
    }

    pub fn checkpoints(&self, cps: &[pb::Checkpoint]) {
        if self.json {
            let v: Vec<Value> = cps.iter().map(json::checkpoint).collect();
            print_json(&v);
            return;
        }
        if cps.is_empty() {
            say!("no checkpoints");
            return;
        }
        let rows: Vec<Vec<String>> = cps
            .iter()
            .map(|c| {
                vec![
                    c.iteration.to_string(),
                    c.attempt.to_string(),
                    checkpoint_state(c.state),
                    c.bytes.to_string(),
                    if c.on_stop { "stop" } else { "interval" }.to_string(),
                    c.uri.clone(),
                ]
            })
            .collect();
        table(&["ITER", "ATTEMPT", "STATE", "BYTES", "WHY", "URI"], &rows);
    }

    pub fn attempts(&self, attempts: &[pb::Attempt]) {
        if self.json {
            let v: Vec<Value> = attempts.iter().map(json::attempt).collect();
            print_json(&v);
            return;
        }
        if attempts.is_empty() {
            say!("no attempts yet");
            return;
        }
        let rows: Vec<Vec<String>> = attempts
            .iter()
            .map(|a| {
                vec![
                    a.attempt.to_string(),
                    attempt_state(a.state),
                    a.world_size.to_string(),
                    a.accumulate_steps.to_string(),
                    a.resumed_from_iteration
                        .map(|i| i.to_string())
                        .unwrap_or_else(|| "-".to_string()),
                    a.workers.join(","),
                    a.reason.clone(),
                ]
            })
            .collect();
        table(
            &[
                "ATTEMPT",
                "STATE",
                "WORLD",
                "ACCUMULATE",
                "RESUMED",
                "WORKERS",
                "REASON",
            ],
            &rows,
        );
    }

    pub fn metrics(&self, points: &[pb::MetricPoint]) {
        if self.json {
            let v: Vec<Value> = points.iter().map(json::point).collect();
            print_json(&v);
            return;
        }
        if points.is_empty() {
            say!("no metrics yet");
            return;
        }
        let rows: Vec<Vec<String>> = points
            .iter()
            .map(|p| {
                vec![
                    p.iteration.to_string(),
                    p.attempt.to_string(),
                    p.name.clone(),
                    fmt_num(p.value),
                ]
            })
            .collect();
        table(&["ITER", "ATTEMPT", "NAME", "VALUE"], &rows);
    }

    /// What `drain` / `undrain` left the worker in.
    pub fn worker_state(&self, w: &pb::Worker, state: i32) {
        if self.json {
            print_json(
                &json!({"worker_id": w.id, "worker": worker_name(w), "state": worker_state_name(state)}),
            );
            return;
        }
        let what = match pb::WorkerState::try_from(state) {
            Ok(pb::WorkerState::Draining) => "it is given no new rank until `segtrain undrain`",
            Ok(pb::WorkerState::Busy) => "it runs its rank and is given new ones after it",
            Ok(pb::WorkerState::Idle) => "it is given new ranks",
            _ => "",
        };
        say!(
            "worker {} is {}: {what}",
            worker_name(w),
            worker_state_name(state)
        );
    }

    pub fn workers(&self, ws: &[pb::Worker]) {
        let state = worker_state_name;
        if self.json {
            let v: Vec<Value> = ws.iter().map(json::worker).collect();
            print_json(&v);
            return;
        }
        if ws.is_empty() {
            say!("no workers registered");
            return;
        }
        let rows: Vec<Vec<String>> = ws
            .iter()
            .map(|w| {
                let gpu = if w.gpu_index < 0 {
                    "cpu".to_string()
                } else {
                    format!("{} {}", w.gpu_index, w.gpu_name)
                };
                let job = if w.job_id.is_empty() {
                    String::new()
                } else {
                    format!("{} rank {}", w.job_id, w.rank)
                };
                let state = if w.leaving {
                    format!("{} (leaving)", state(w.state))
                } else {
                    state(w.state)
                };
                vec![w.host.clone(), gpu, state, job, time(&w.last_heartbeat)]
            })
            .collect();
        table(&["HOST", "GPU", "STATE", "JOB", "HEARTBEAT"], &rows);
    }
}

fn fmt_num(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) {
        format!("{v:.4e}")
    } else {
        format!("{v:.4}")
    }
}

/// `segtrain watch` on a terminal: a progress bar (iteration, ETA, loss, lr, images/s) under the
/// event lines. Elsewhere (or with --json) events are printed one per line as they come.
pub struct Live {
    bar: Option<indicatif::ProgressBar>,
}

impl Live {
    pub fn new(json: bool, max_iters: u64, iteration: u64) -> Live {
        use std::io::IsTerminal;
        let bar = (!json && max_iters > 0 && std::io::stdout().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                Some(max_iters),
                indicatif::ProgressDrawTarget::stdout(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} iters  eta {eta}  {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(iteration);
            bar
        });
        Live { bar }
    }

    pub fn event(&mut self, out: &Printer, ev: &pb::JobEvent) {
        use pb::job_event::Payload;
        let Some(bar) = &self.bar else {
            out.event(ev);
            return;
        };
        match &ev.payload {
            // Metrics move the bar instead of printing a line each.
            Some(Payload::Metrics(m)) => {
                let v = |k: &str| m.values.get(k).copied().unwrap_or(f64::NAN);
                bar.set_position(m.iteration);
                bar.set_message(format!(
                    "loss {:.4}  lr {:.2e}  {:.1} img/s",
                    v("loss"),
                    v("lr"),
                    v("images_per_s")
                ));
            }
            _ => bar.suspend(|| out.event(ev)),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Printer {
    /// The new token alone on stdout (so `segtrain token create ... > file` keeps just the
    /// secret); what it is on stderr. With `--json`, one document with the token in it.
    pub fn token_created(&self, token: &str, info: &pb::TokenInfo) {
        if self.json {
            let mut v = json::token(info);
            v["token"] = Value::String(token.to_string());
            print_json(&v);
        } else {
            say_err!(
                "created {} token {:?} ({}); it is shown only now, store it:",
                role_name(info.role),
                info.name,
                info.id
            );
            say!("{token}");
        }
    }

    pub fn tokens(&self, ts: &[pb::TokenInfo]) {
        if self.json {
            let v: Vec<Value> = ts.iter().map(json::token).collect();
            print_json(&v);
            return;
        }
        if ts.is_empty() {
            say!("no tokens");
            return;
        }
        let rows: Vec<Vec<String>> = ts
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    role_name(t.role),
                    t.name.clone(),
                    time(&t.created_at),
                    time(&t.last_used_at),
                    time(&t.revoked_at),
                    t.principal.clone(),
                    t.team.clone(),
                    t.host.clone(),
                ]
            })
            .collect();
        table(
            &[
                "ID",
                "ROLE",
                "NAME",
                "CREATED",
                "LAST USED",
                "REVOKED",
                "PRINCIPAL",
                "TEAM",
                "HOST",
            ],
            &rows,
        );
    }

    pub fn teams(&self, ts: &[pb::Team]) {
        if self.json {
            let v: Vec<Value> = ts.iter().map(json::team).collect();
            print_json(&v);
            return;
        }
        let limit = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
        let rows: Vec<Vec<String>> = ts
            .iter()
            .map(|t| {
                vec![
                    t.name.clone(),
                    limit(t.max_priority.map(|p| p.to_string())),
                    limit(t.max_gpus.map(|g| g.to_string())),
                    t.held_gpus.to_string(),
                    limit((!t.allowed_roots.is_empty()).then(|| t.allowed_roots.join(", "))),
                ]
            })
            .collect();
        table(
            &[
                "TEAM",
                "MAX PRIORITY",
                "MAX GPUS",
                "HELD GPUS",
                "ALLOWED ROOTS",
            ],
            &rows,
        );
    }

    pub fn token_revoked(&self, t: &pb::TokenInfo) {
        if self.json {
            print_json(&json::token(t));
        } else {
            say!(
                "revoked {} token {:?} ({})",
                role_name(t.role),
                t.name,
                t.id
            );
        }
    }
}

/// "alice (vision)"; "(vision)" for a job from before owners were recorded.
fn owner(j: &JobView) -> String {
    if j.submitted_by.is_empty() {
        format!("({})", j.team)
    } else {
        format!("{} ({})", j.submitted_by, j.team)
    }
}
