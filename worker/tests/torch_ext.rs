//! The C++ shim's switches take effect and are restored (observable without a GPU: the flags
//! live in libtorch's global and thread-local state).

use segtrain_trainer::torch_ext;

#[test]
fn bf16_autocast_is_enabled_inside_and_restored_after_even_on_panic() {
    assert!(!torch_ext::autocast_enabled());
    let inside = torch_ext::with_bf16_autocast(|| {
        (torch_ext::autocast_enabled(), torch_ext::autocast_is_bf16())
    });
    assert_eq!(
        inside,
        (true, true),
        "autocast on, dtype bf16 (tch's own autocast is fp16)"
    );
    assert!(!torch_ext::autocast_enabled(), "restored");

    // Nested regions restore the outer state.
    torch_ext::with_bf16_autocast(|| {
        torch_ext::with_bf16_autocast(|| assert!(torch_ext::autocast_enabled()));
        assert!(torch_ext::autocast_enabled(), "outer region still on");
    });
    assert!(!torch_ext::autocast_enabled());

    let r =
        std::panic::catch_unwind(|| torch_ext::with_bf16_autocast(|| panic!("inside autocast")));
    assert!(r.is_err());
    assert!(!torch_ext::autocast_enabled(), "restored after a panic");

    // Thread-local: another thread never sees it.
    torch_ext::with_bf16_autocast(|| {
        let other = std::thread::spawn(torch_ext::autocast_enabled)
            .join()
            .expect("thread");
        assert!(!other);
    });
}

#[test]
fn tf32_and_cudnn_switches_take_effect() {
    torch_ext::set_tf32(true);
    torch_ext::set_cudnn_flags(true, false);
    assert_eq!(torch_ext::switches(), (true, true, true, false));
    torch_ext::set_tf32(false);
    torch_ext::set_cudnn_flags(false, true);
    assert_eq!(torch_ext::switches(), (false, false, false, true));
}

#[test]
fn cuda_memory_statistics_follow_allocations_or_are_absent_without_cuda() {
    if !tch::Cuda::is_available() {
        // The CUDA allocator is not set up (or not linked): no numbers, and no crash.
        assert_eq!(torch_ext::cuda_memory(0), None);
        return;
    }
    let device = tch::Device::Cuda(0);
    let t = tch::Tensor::zeros([64, 1024, 1024], (tch::Kind::Float, device));
    let m = torch_ext::cuda_memory(0).expect("statistics once a tensor lives on the GPU");
    assert!(m.allocated >= 256 << 20, "{m:?}");
    assert!(
        m.peak_allocated >= m.allocated && m.reserved >= m.allocated,
        "{m:?}"
    );
    drop(t);
    let after = torch_ext::cuda_memory(0).expect("statistics");
    assert!(after.allocated < m.allocated, "{after:?}");
    assert!(
        after.peak_allocated >= m.allocated,
        "the peak stays: {after:?}"
    );
}
