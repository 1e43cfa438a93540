//! Teams' limits as decisions (rows in, a verdict out): the highest priority a team may submit
//! at, and how many GPUs its jobs may hold at once. The store reads the rows
//! (`store::teams`), the API and the placement ask here.

/// What an operator set for a team (`segtrain team set`); `None`: no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamLimits {
    pub max_priority: Option<i32>,
    pub max_gpus: Option<u32>,
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
        };
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
