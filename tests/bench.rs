//! `retrain bench` measures each workload and reports it as JSON (small sizes here; the
//! real comparison with PyTorch is tools/bench.py, recorded in BENCHMARKS.md).

mod common;
use common::*;

#[test]
fn bench_reports_every_workload() {
    for workload in ["inference", "full", "partial"] {
        let out = retrain_ok([
            "bench",
            "--arch",
            "mobilenet_v2",
            "--workload",
            workload,
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--warmup",
            "0",
            "--steps",
            "1",
            "--json",
        ]);
        let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["workload"], workload);
        assert!(r["images_per_second"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["peak_memory_mib"].as_f64().unwrap() > 0.0, "{r}");
    }
    let out = retrain_ok([
        "bench",
        "--arch",
        "resnet18",
        "--workload",
        "head",
        "--image-size",
        "32",
        "--batch-size",
        "64",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(r["seconds"].as_f64().unwrap() > 0.0, "{r}");
}
