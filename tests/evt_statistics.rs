//! Statistical properties of the extreme-value thresholds on synthetic score streams.

use anomalyd::evt::{Dspot, Spot, SpotConfig};
use anomalyd::model::Calibration;
use anomalyd::threshold::{Threshold, ThresholdConfig};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp, Normal, Pareto};

fn stream(dist: &str, seed: u64) -> Box<dyn Iterator<Item = f64>> {
    let mut rng = SmallRng::seed_from_u64(seed);
    match dist {
        "gaussian" => {
            let d = Normal::new(1.0, 0.2).unwrap();
            Box::new(std::iter::repeat_with(move || d.sample(&mut rng)))
        }
        "exponential" => {
            let d = Exp::new(2.0).unwrap();
            Box::new(std::iter::repeat_with(move || d.sample(&mut rng)))
        }
        "pareto" => {
            let d = Pareto::new(1.0, 3.0).unwrap();
            Box::new(std::iter::repeat_with(move || d.sample(&mut rng)))
        }
        _ => unreachable!(),
    }
}

fn calibration(dist: &str, n: usize) -> Calibration {
    let mut sample: Vec<f64> = stream(dist, 1000).take(n).collect();
    sample.sort_by(f64::total_cmp);
    Calibration {
        count: n as u64,
        sample,
        ..Calibration::default()
    }
}

/// SPOT's false-alarm rate on a stationary stream stays within [q/3, 3q] over a million points.
#[test]
fn spot_false_alarm_rate_matches_the_risk_on_stationary_streams() {
    let n = 1_000_000;
    for dist in ["gaussian", "exponential", "pareto"] {
        for q in [1e-3, 1e-4] {
            let cfg = SpotConfig {
                q,
                ..SpotConfig::default()
            };
            let mut spot = Spot::calibrate(&cfg, &calibration(dist, 2000).sample);
            let alarms = stream(dist, 7)
                .take(n)
                .filter(|&x| spot.judge(x).is_anomaly)
                .count();
            let rate = alarms as f64 / n as f64;
            eprintln!(
                "{dist:12} q={q:e}: false-alarm rate {rate:.2e} ({alarms} alarms), tail γ={:.3}",
                spot.gpd().gamma
            );
            assert!(
                rate >= q / 3.0 && rate <= 3.0 * q,
                "{dist}, q={q}: false-alarm rate {rate:e} outside [q/3, 3q]"
            );
        }
    }
}

/// DSPOT follows a drifting level without alarming on the drift, and still sees a jump.
#[test]
fn dspot_follows_a_drifting_level_without_alarming_on_it() {
    let q = 1e-3;
    let cfg = SpotConfig {
        q,
        ..SpotConfig::default()
    };
    let mut dspot = Dspot::calibrate(&cfg, &calibration("gaussian", 2000).sample);
    let mut spot = Spot::calibrate(&cfg, &calibration("gaussian", 2000).sample);
    let n = 200_000;
    let (mut d_alarms, mut s_alarms) = (0, 0);
    for (i, noise) in stream("gaussian", 9).take(n).enumerate() {
        // The level climbs from 1 to 11: fifty standard deviations.
        let x = noise + 10.0 * i as f64 / n as f64;
        d_alarms += usize::from(dspot.judge(x).is_anomaly);
        s_alarms += usize::from(spot.judge(x).is_anomaly);
    }
    let rate = d_alarms as f64 / n as f64;
    eprintln!("drift: DSPOT false-alarm rate {rate:.2e} ({d_alarms}), SPOT {s_alarms} alarms");
    assert!(rate <= 3.0 * q, "DSPOT alarmed on the drift: rate {rate:e}");
    assert!(
        s_alarms > 2 * d_alarms,
        "plain SPOT should alarm more on the drift ({s_alarms} vs DSPOT's {d_alarms})"
    );
    assert!(
        dspot.judge(11.0 + 2.0).is_anomaly,
        "a jump of 10σ over the drifted level"
    );
}

/// Thresholds warm-started from calibration do not alarm on the first normal points of a key,
/// where a cold start (no calibration) does.
#[test]
fn warm_started_thresholds_do_not_alarm_on_first_normal_points() {
    let first_points = |template: &dyn Threshold, dist: &str| {
        let mut points = stream(dist, 11);
        // 1000 new keys, each judging its first 10 normal points.
        (0..1000)
            .map(|_| {
                let mut t = template.clone_box();
                (0..10)
                    .filter(|_| t.judge(points.next().unwrap()).is_anomaly)
                    .count()
            })
            .sum::<usize>()
    };
    for dist in ["gaussian", "exponential", "pareto"] {
        let methods: &[&str] = match dist {
            // mean + kσ is a Gaussian rule; on heavy tails it alarms by design.
            "gaussian" => &["spot", "dspot", "quantile", "ewma"],
            _ => &["spot", "dspot", "quantile"],
        };
        for method in methods {
            let cfg = toml_threshold(&format!("method = \"{method}\""));
            let warm = first_points(&*cfg.build(&calibration(dist, 2000)), dist);
            let cold = first_points(&*cfg.build(&Calibration::default()), dist);
            eprintln!(
                "{dist:12} {method:9} alarms in 10,000 first points: warm {warm}, cold {cold}"
            );
            // At most 0.4 %: the nominal rates are 1e-4 (SPOT) and 1e-3 (quantile).
            assert!(
                warm <= 40,
                "{dist} {method}: {warm} alarms in 10,000 first normal points"
            );
        }
    }
}

fn toml_threshold(text: &str) -> ThresholdConfig {
    #[derive(serde::Deserialize)]
    struct W {
        threshold: ThresholdConfig,
    }
    let w: W = config::Config::builder()
        .add_source(config::File::from_str(
            &format!("[threshold]\n{text}\n"),
            config::FileFormat::Toml,
        ))
        .build()
        .unwrap()
        .try_deserialize()
        .unwrap();
    w.threshold
}
