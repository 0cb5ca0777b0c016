//! The round split into server and client halves (`fedsvd::server`, what a
//! Flower deployment runs in separate processes) computes what the
//! simulation computes, bit for bit, on the tiny random BERT.

mod common;
use common::synthetic;

use fedsvd::server::{Participant, RoundOutcome, Server, nodes_for_clients, sampled_clients};
use fedsvd::{
    BudgetRule, ClientData, Federation, FederationConfig, Method, PrivacyConfig, TrainingConfig,
};
use fedsvd_dp::AccountantKind;
use fedsvd_model::testing::{random_weights, tiny_config};
use fedsvd_model::{HeadConfig, LoraConfig, Pooling};

fn config(method: Method, budget_rule: BudgetRule, rounds: usize) -> FederationConfig {
    FederationConfig {
        method,
        rounds,
        clients_per_round: 2,
        eval_every: 1,
        training: TrainingConfig {
            local_steps: 2,
            batch_size: 8,
            physical_batch_size: 5,
            lr: 0.5,
        },
        privacy: PrivacyConfig {
            epsilon: Some(3.0),
            delta: 1e-5,
            clip: 1.0,
            accountant: AccountantKind::Rdp,
            budget_rule,
            report_unprotected: true,
            max_grad_norm: None,
        },
        seed: Some(11),
    }
}

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        ..LoraConfig::default()
    }
}

fn head() -> HeadConfig {
    HeadConfig {
        num_labels: 2,
        pooling: Pooling::Mean,
    }
}

fn clients() -> Vec<ClientData> {
    (0..4)
        .map(|k| synthetic(20 + 5 * k, k as u64 + 1))
        .collect()
}

/// Runs the federation both ways and compares every round: sampled
/// clients, who trained, who was out of budget, evaluation, every client's
/// ε and the global state, all exactly.
fn split_equals_simulation(config: FederationConfig) {
    let weights = random_weights(&tiny_config()).unwrap();
    let test = synthetic(30, 99);
    let mut simulation = Federation::new(
        config,
        weights.clone(),
        lora(),
        head(),
        clients(),
        test.clone(),
    )
    .unwrap();
    let mut server = Server::new(config, weights.clone(), lora(), head(), 4, test, None).unwrap();
    let mut participants: Vec<Participant> = clients()
        .into_iter()
        .enumerate()
        .map(|(k, data)| {
            Participant::new(
                config,
                weights.clone(),
                lora(),
                head(),
                4,
                k,
                data,
                server.init_seed(),
            )
            .unwrap()
        })
        .collect();
    assert_eq!(&participants[0].initial_state(), server.state());
    let mut exhausted_rounds = 0;
    for round in 0..config.rounds {
        let metrics = simulation.run_round().unwrap();
        let sampled = server.sample(round);
        assert_eq!(sampled, metrics.sampled_clients, "round {round}");
        let mut updates = Vec::new();
        let mut exhausted = Vec::new();
        let state = server.state().clone();
        for &k in &sampled {
            match participants[k].train_round(&state, round).unwrap() {
                RoundOutcome::Trained { update, .. } => updates.push((k, update)),
                RoundOutcome::BudgetExhausted { spent, would_reach } => {
                    assert!(spent <= 3.0 && would_reach > 3.0);
                    exhausted.push(k);
                }
            }
        }
        assert_eq!(exhausted, metrics.budget_exhausted_clients);
        exhausted_rounds += usize::from(!exhausted.is_empty());
        // The server takes the updates in whatever order they arrive.
        updates.reverse();
        let step = server.step(round, updates).unwrap();
        assert_eq!(step.refactorized, metrics.refactorized, "round {round}");
        assert_eq!(server.state(), simulation.state(), "round {round}");
        let eval = server.evaluate().unwrap();
        assert_eq!(Some(eval.accuracy), metrics.eval_accuracy);
        assert_eq!(Some(eval.loss), metrics.eval_loss);
        let epsilons: Vec<Option<f64>> = participants
            .iter()
            .map(|p| p.spent_epsilon().unwrap())
            .collect();
        assert_eq!(epsilons, metrics.client_epsilon, "round {round}");
    }
    if config.privacy.budget_rule == BudgetRule::Expected {
        assert!(exhausted_rounds > 0, "no client reached its budget");
    }
}

#[test]
fn the_split_round_is_the_simulated_round_for_every_method() {
    for method in [
        Method::fedsvd(),
        Method::Ffa,
        Method::Fedavg,
        Method::Flora,
        Method::Fedex,
    ] {
        split_equals_simulation(config(method, BudgetRule::Conservative, 3));
    }
}

#[test]
fn a_client_at_its_budget_refuses_as_the_simulation_skips_it() {
    // Calibrated for the expected participation (K'/K = 1/2 of 6 rounds),
    // a client sampled more often than that reaches its budget early.
    split_equals_simulation(config(Method::Ffa, BudgetRule::Expected, 6));
}

#[test]
fn sampling_with_fewer_per_round_maps_nodes_by_partition_id() {
    let sampled = sampled_clients(6, 2, Some(5), 3);
    assert_eq!(sampled.len(), 2);
    assert_eq!(sampled, sampled_clients(6, 2, Some(5), 3));
    // Node ids unrelated to partition ids, in a shuffled order.
    let nodes: Vec<(u64, usize)> = [4, 0, 5, 2, 1, 3]
        .iter()
        .map(|&p| (1000 + 7 * p as u64, p))
        .collect();
    let chosen = nodes_for_clients(&sampled, &nodes).unwrap();
    let expected: Vec<u64> = sampled.iter().map(|&k| 1000 + 7 * k as u64).collect();
    assert_eq!(chosen, expected);
    // A sampled partition that no node serves is named.
    let missing: Vec<(u64, usize)> = nodes
        .iter()
        .copied()
        .filter(|&(_, p)| p != sampled[0])
        .collect();
    let err = nodes_for_clients(&sampled, &missing).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "{} was sampled, but no connected node",
            sampled[0]
        )),
        "{err}"
    );
    // Two nodes claiming one partition are refused.
    let mut twice = nodes.clone();
    twice.push((77, 2));
    let err = nodes_for_clients(&sampled, &twice).unwrap_err();
    assert!(err.to_string().contains("claimed by nodes"), "{err}");
    // Over many rounds every client is sampled (the mapping is not stuck).
    let mut seen = [false; 6];
    for round in 0..40 {
        for k in sampled_clients(6, 2, Some(5), round) {
            seen[k] = true;
        }
    }
    assert!(seen.iter().all(|&s| s));
}

#[test]
fn the_server_refuses_updates_from_clients_it_did_not_sample() {
    let config = config(Method::fedsvd(), BudgetRule::Conservative, 2);
    let weights = random_weights(&tiny_config()).unwrap();
    let mut server = Server::new(
        config,
        weights.clone(),
        lora(),
        head(),
        4,
        synthetic(30, 99),
        None,
    )
    .unwrap();
    let sampled = server.sample(0);
    let other = (0..4).find(|k| !sampled.contains(k)).unwrap();
    let mut participant = Participant::new(
        config,
        weights,
        lora(),
        head(),
        4,
        other,
        clients().swap_remove(other),
        server.init_seed(),
    )
    .unwrap();
    let RoundOutcome::Trained { update, .. } =
        participant.train_round(&server.state().clone(), 0).unwrap()
    else {
        panic!("the client should have trained");
    };
    let before = server.state().clone();
    let err = server.step(0, vec![(other, update)]).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("an update from client {other} in round 1")),
        "{err}"
    );
    assert_eq!(server.state(), &before);
    assert_eq!(server.next_round(), 0);
}
