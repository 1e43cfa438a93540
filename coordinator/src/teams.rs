//! Teams' limits as decisions (rows in, a verdict out): the highest priority a team may submit
//! at, where its specs' paths may point, and how many GPUs its jobs may hold at once. The store
//! reads the rows (`store::teams`), the API and the placement ask here.

use segtrain_spec::location::is_within;
use segtrain_spec::JobSpec;

/// What an operator set for a team (`segtrain team set`); `None` or empty: no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TeamLimits {
    pub max_priority: Option<i32>,
    pub max_gpus: Option<u32>,
    /// Where its specs' paths may point (`segtrain_spec::location::is_within` one of them).
    pub allowed_roots: Vec<String>,
}

/// The refusal of a spec with a path outside the team's allowed roots, naming the field, the
/// path and the roots.
pub fn check_paths(team: &str, limits: &TeamLimits, spec: &JobSpec) -> Result<(), String> {
    let roots = &limits.allowed_roots;
    if roots.is_empty() {
        return Ok(());
    }
    let paths = [
        ("dataset_root", Some(&spec.dataset_root)),
        ("pretrained", spec.pretrained.as_ref()),
        ("resume_from", spec.resume_from.as_ref()),
        ("checkpoint_root", Some(&spec.checkpoint_root)),
    ];
    for (field, path) in paths {
        let Some(path) = path else { continue };
        if !roots.iter().any(|r| is_within(r, path)) {
            return Err(format!(
                "spec.{field}: {path:?} is outside the roots team {team} may use: {}",
                roots.join(", ")
            ));
        }
    }
    Ok(())
}

/// The refusal of a submission above the team's highest priority, naming the field.
pub fn check_priority(team: &str, limits: &TeamLimits, priority: i32) -> Result<(), String> {
    match limits.max_priority {
        Some(max) if priority > max => Err(format!(
            "spec.priority: team {team} may submit at priority {max} at most, got {priority}"
        )),
        _ => Ok(()),
    }
}

/// GPUs the team may still take: `None` without a limit.
pub fn room(limits: &TeamLimits, held: u32) -> Option<u32> {
    limits.max_gpus.map(|max| max.saturating_sub(held))
}

/// Why a queued job of `team` that needs `needs` GPUs at least waits for its team, if it does.
pub fn waiting_reason(team: &str, limits: &TeamLimits, held: u32, needs: u32) -> Option<String> {
    let max = limits.max_gpus?;
    (room(limits, held)? < needs).then(|| {
        format!(
            "waiting for team {team}'s GPUs: it holds {held} of its {max} (max_gpus) and this job \
             needs {needs}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_decide() {
        let none = TeamLimits::default();
        let some = TeamLimits {
            max_priority: Some(10),
            max_gpus: Some(4),
            allowed_roots: vec!["/data/vision".into(), "gs://vision-ckpt".into()],
        };
        let mut spec = JobSpec {
            checkpoint_root: "gs://vision-ckpt/runs".into(),
            ..JobSpec::with_defaults("/data/vision/cityscapes")
        };
        assert!(check_paths("vision", &some, &spec).is_ok());
        assert!(check_paths("vision", &none, &spec).is_ok());
        spec.pretrained = Some("/data/audio/mit_b0.safetensors".into());
        let e = check_paths("vision", &some, &spec).unwrap_err();
        assert!(
            e.starts_with("spec.pretrained: \"/data/audio/mit_b0.safetensors\" is outside")
                && e.ends_with("/data/vision, gs://vision-ckpt"),
            "{e}"
        );
        assert!(check_priority("t", &none, 1000).is_ok());
        assert!(check_priority("t", &some, 10).is_ok());
        let e = check_priority("vision", &some, 11).unwrap_err();
        assert!(
            e.starts_with("spec.priority: team vision may submit at priority 10"),
            "{e}"
        );
        assert_eq!(room(&none, 100), None);
        assert_eq!(room(&some, 1), Some(3));
        assert_eq!(room(&some, 9), Some(0));
        assert_eq!(waiting_reason("t", &none, 9, 9), None);
        assert_eq!(waiting_reason("t", &some, 2, 2), None);
        let why = waiting_reason("vision", &some, 3, 2).expect("waits");
        assert!(
            why.contains("holds 3 of its 4 (max_gpus)") && why.contains("needs 2"),
            "{why}"
        );
    }
}
