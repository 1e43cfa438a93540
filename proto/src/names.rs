//! How people name things the API carries as numbers, the same in the coordinator's messages
//! and the CLI's output.

/// A worker's GPU index as people name it: `cpu` for -1.
pub fn gpu_label(gpu_index: i32) -> String {
    if gpu_index < 0 {
        "cpu".to_string()
    } else {
        gpu_index.to_string()
    }
}

/// A worker as people name it: `host:GPU`, `host:cpu` for a CPU worker.
pub fn worker_name(host: &str, gpu_index: i32) -> String {
    format!("{host}:{}", gpu_label(gpu_index))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_workers_are_named_cpu() {
        assert_eq!(super::worker_name("a", -1), "a:cpu");
        assert_eq!(super::worker_name("b", 3), "b:3");
    }
}
