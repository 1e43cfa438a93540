//! `segtrain export`: a job's metric points, every page of GetMetrics, as CSV, JSON or
//! TensorBoard event files (docs/export.md).

use crate::tensorboard::EventWriter;
use anyhow::{bail, Context};
use segtrain_proto::client::AuthChannel;
use segtrain_proto::v1 as pb;
use segtrain_proto::v1::job_service_client::JobServiceClient;
use std::io::Write;
use std::path::Path;

/// Points per GetMetrics call (the largest page it allows).
const PAGE: u32 = 100_000;

/// Every point GetMetrics serves for `job_id`, in its order (iteration, then name; the newest
/// attempt's point of each iteration). A page can end inside an iteration, so each next page
/// starts again at the last page's last iteration, whose points it replaces.
pub async fn all_points(
    jobs: &mut JobServiceClient<AuthChannel>,
    job_id: &str,
    names: &[String],
) -> Result<Vec<pb::MetricPoint>, tonic::Status> {
    let mut out: Vec<pb::MetricPoint> = Vec::new();
    let mut since = 0;
    loop {
        let page = jobs
            .get_metrics(pb::GetMetricsRequest {
                job_id: job_id.to_string(),
                names: names.to_vec(),
                since_iteration: since,
                limit: PAGE,
            })
            .await?
            .into_inner()
            .points;
        let full = page.len() == PAGE as usize;
        let last = page.last().map(|p| p.iteration);
        out.retain(|p| p.iteration < since);
        out.extend(page);
        match last {
            // One iteration with a page's worth of names cannot be split further.
            Some(last) if full && last > since => since = last,
            Some(_) if full => {
                return Err(tonic::Status::out_of_range(format!(
                    "iteration {since} of job {job_id} has more than {PAGE} points"
                )))
            }
            _ => return Ok(out),
        }
    }
}

/// `attempt,iteration,name,value` with a header line; names are quoted when they need it.
pub fn write_csv(points: &[pb::MetricPoint], w: &mut dyn Write) -> std::io::Result<()> {
    writeln!(w, "attempt,iteration,name,value")?;
    for p in points {
        let name = if p.name.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", p.name.replace('"', "\"\""))
        } else {
            p.name.clone()
        };
        writeln!(w, "{},{},{},{}", p.attempt, p.iteration, name, p.value)?;
    }
    Ok(())
}

/// The same array of points as `segtrain metrics --json` (a non-finite value is null).
pub fn write_json(points: &[pb::MetricPoint], w: &mut dyn Write) -> std::io::Result<()> {
    let v: Vec<serde_json::Value> = points.iter().map(segtrain_proto::json::point).collect();
    serde_json::to_writer_pretty(&mut *w, &v)?;
    writeln!(w)
}

/// One TensorBoard run in `dir`: a scalar per point, tagged by its name, at step = iteration.
/// Merged over attempts as GetMetrics serves them (a resumed attempt's points replace the failed
/// one's for the iterations it re-ran), so the curve is the one the job's model followed.
/// Returns the file written.
pub fn write_tensorboard(
    job_id: &str,
    points: &[pb::MetricPoint],
    dir: &Path,
) -> anyhow::Result<std::path::PathBuf> {
    if dir.exists() && !dir.is_dir() {
        bail!("DIR {}: exists and is not a directory", dir.display());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("DIR {}: cannot create", dir.display()))?;
    let wall_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // TensorBoard reads files whose name contains "tfevents"; the job id keeps two jobs'
    // exports to one directory apart.
    let path = dir.join(format!(
        "events.out.tfevents.{}.segtrain-{job_id}",
        wall_time.as_secs()
    ));
    let file = std::fs::File::create(&path)
        .with_context(|| format!("DIR {}: cannot write {}", dir.display(), path.display()))?;
    let mut events = EventWriter::new(std::io::BufWriter::new(file), wall_time.as_secs_f64())?;
    for p in points {
        events.scalar(&p.name, p.iteration, p.value)?;
    }
    let file = events.finish()?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(path)
}
