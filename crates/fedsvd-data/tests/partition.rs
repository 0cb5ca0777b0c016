//! Dirichlet and IID partitions: every example assigned exactly once, shares
//! that follow the draw, skew that grows as α shrinks, the Dirichlet's
//! moments, the minimum per client, seeded determinism, and the report.

use fedsvd_data::{
    Error, Partition, PartitionReport, partition_dirichlet, partition_iid, train_test_split,
};

/// `n` labels over `classes` classes with unequal class sizes: class c gets
/// c + 1 of every classes·(classes+1)/2 consecutive examples.
fn labels(n: usize, classes: usize) -> Vec<usize> {
    let cycle: Vec<usize> = (0..classes)
        .flat_map(|c| std::iter::repeat_n(c, c + 1))
        .collect();
    (0..n).map(|i| cycle[i % cycle.len()]).collect()
}

fn assert_exact_cover(p: &Partition, indices: &[usize]) {
    let mut all: Vec<usize> = p.clients.iter().flatten().copied().collect();
    all.sort_unstable();
    let mut expected = indices.to_vec();
    expected.sort_unstable();
    assert_eq!(all, expected, "every example exactly once");
}

#[test]
fn dirichlet_assigns_every_example_exactly_once() {
    let l = labels(2_000, 4);
    let split = train_test_split(&l, 0.25, 3).unwrap();
    for (alpha, seed) in [(0.05, 1), (0.5, 2), (1.0, 3), (100.0, 4)] {
        let p = partition_dirichlet(&l, &split.train, 6, alpha, 1, seed).unwrap();
        assert_eq!(p.clients.len(), 6);
        assert_exact_cover(&p, &split.train);
        assert!(p.clients.iter().all(|c| !c.is_empty()));
        assert!(
            p.clients
                .iter()
                .flatten()
                .all(|i| split.test.binary_search(i).is_err()),
            "no client sees a test example"
        );
    }
}

#[test]
fn shares_follow_the_draw() {
    let l = labels(3_000, 3);
    let idx: Vec<usize> = (0..l.len()).collect();
    let p = partition_dirichlet(&l, &idx, 5, 0.5, 1, 11).unwrap();
    let proportions = p.proportions.as_ref().unwrap();
    assert_eq!(p.classes, [0, 1, 2]);
    for (c, row) in proportions.iter().enumerate() {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let class_size = l.iter().filter(|&&x| x == p.classes[c]).count();
        for (k, &share) in row.iter().enumerate() {
            let got = p.clients[k]
                .iter()
                .filter(|&&i| l[i] == p.classes[c])
                .count();
            let want = share * class_size as f64;
            assert!(
                (got as f64 - want).abs() < 1.0,
                "class {c}, client {k}: {got} examples for a share of {want:.2}"
            );
        }
    }
}

/// Mean total-variation distance between each client's label distribution
/// and the global one.
fn skew(p: &Partition, l: &[usize], classes: usize) -> f64 {
    let total = p.clients.iter().map(Vec::len).sum::<usize>() as f64;
    let mut global = vec![0.0; classes];
    for c in &p.clients {
        for &i in c {
            global[l[i]] += 1.0 / total;
        }
    }
    let mut sum = 0.0;
    for c in &p.clients {
        let mut local = vec![0.0; classes];
        for &i in c {
            local[l[i]] += 1.0 / c.len() as f64;
        }
        sum += 0.5
            * local
                .iter()
                .zip(&global)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>();
    }
    sum / p.clients.len() as f64
}

#[test]
fn smaller_alpha_gives_more_skew() {
    let l = labels(3_000, 4);
    let idx: Vec<usize> = (0..l.len()).collect();
    let mean_skew = |alpha: f64| {
        (0..20)
            .map(|seed| {
                skew(
                    &partition_dirichlet(&l, &idx, 6, alpha, 1, seed).unwrap(),
                    &l,
                    4,
                )
            })
            .sum::<f64>()
            / 20.0
    };
    let (s01, s1, s100) = (mean_skew(0.1), mean_skew(1.0), mean_skew(100.0));
    assert!(
        s01 > s1 && s1 > s100,
        "skew: α=0.1 {s01:.3}, α=1 {s1:.3}, α=100 {s100:.3}"
    );
    assert!(s100 < 0.05, "α=100 is nearly IID: {s100:.3}");
    assert!(s01 > 0.4, "α=0.1 is strongly skewed: {s01:.3}");
    let iid = partition_iid(&l, &idx, 6, 0).unwrap();
    assert!(skew(&iid, &l, 4) < 0.05);
}

#[test]
fn draws_have_the_dirichlet_moments() {
    // p ~ Dir(α·1_K): E[p_k] = 1/K, Var[p_k] = (K−1)/(K²(Kα+1)).
    let k = 6;
    let classes = 10;
    let l: Vec<usize> = (0..2_000).map(|i| i % classes).collect();
    let idx: Vec<usize> = (0..l.len()).collect();
    for alpha in [0.5, 2.0] {
        let mut values = Vec::new();
        for seed in 0..300 {
            let p = partition_dirichlet(&l, &idx, k, alpha, 1, seed).unwrap();
            values.extend(p.proportions.unwrap().into_iter().flatten());
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let kf = k as f64;
        let want_var = (kf - 1.0) / (kf * kf * (kf * alpha + 1.0));
        assert!((mean - 1.0 / kf).abs() < 1e-9, "shares of a draw sum to 1");
        assert!(
            (var / want_var - 1.0).abs() < 0.08,
            "α = {alpha}: variance {var:.5}, Dirichlet gives {want_var:.5}"
        );
    }
}

#[test]
fn minimum_per_client_is_enforced_by_redrawing() {
    let l = labels(1_200, 3);
    let idx: Vec<usize> = (0..l.len()).collect();
    let p = partition_dirichlet(&l, &idx, 6, 0.1, 60, 9).unwrap();
    assert!(
        p.clients.iter().all(|c| c.len() >= 60),
        "{:?}",
        p.clients.iter().map(Vec::len).collect::<Vec<_>>()
    );
    assert!(
        p.attempts > 1,
        "α = 0.1 rarely meets 60 per client at the first draw"
    );
    assert_exact_cover(&p, &idx);
    // Impossible: 6 × 201 > 1,200.
    assert!(matches!(
        partition_dirichlet(&l, &idx, 6, 0.5, 201, 9),
        Err(Error::Infeasible(_))
    ));
    // Possible in principle, hopeless in practice: a clear error, not a hang.
    assert!(matches!(
        partition_dirichlet(&l, &idx, 6, 0.001, 200, 9),
        Err(Error::Infeasible(_))
    ));
}

#[test]
fn partitions_are_deterministic_for_a_seed() {
    let l = labels(1_000, 4);
    let idx: Vec<usize> = (0..l.len()).step_by(2).collect();
    let a = partition_dirichlet(&l, &idx, 6, 0.5, 1, 42).unwrap();
    assert_eq!(a, partition_dirichlet(&l, &idx, 6, 0.5, 1, 42).unwrap());
    assert_ne!(
        a.clients,
        partition_dirichlet(&l, &idx, 6, 0.5, 1, 43)
            .unwrap()
            .clients
    );
    let b = partition_iid(&l, &idx, 6, 42).unwrap();
    assert_eq!(b, partition_iid(&l, &idx, 6, 42).unwrap());
    assert_ne!(b.clients, partition_iid(&l, &idx, 6, 43).unwrap().clients);
    assert_exact_cover(&b, &idx);
}

#[test]
fn report_counts_examples_per_client_per_label() {
    let l = vec![0, 0, 1, 1, 1, 2];
    let p = Partition {
        clients: vec![vec![0, 2], vec![1, 3, 4, 5]],
        proportions: None,
        classes: vec![0, 1, 2],
        attempts: 1,
    };
    let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let r = PartitionReport::new(&p, &l, &names).unwrap();
    assert_eq!(r.counts, [[1, 1, 0], [1, 2, 1]]);
    assert_eq!(r.client_totals(), [2, 4]);
    let shares = r.label_shares();
    assert_eq!(shares[0], [0.5, 1.0 / 3.0, 0.0]);
    assert_eq!(shares[1], [0.5, 2.0 / 3.0, 1.0]);
    let text = r.to_string();
    assert!(text.contains("2 (66.7%)"), "{text}");
    assert!(
        PartitionReport::new(&p, &l, &names[..2]).is_err(),
        "label 2 has no name"
    );
}
