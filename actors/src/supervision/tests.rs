//! Kernel tests on tokio's paused clock with fixed jitter: every restart, kill and
//! shutdown is asserted at its exact instant.
//!
//! A [`TestChild`] reports each start and stop on a channel with `Instant::now()`; on the
//! paused clock time moves only when every task is idle, straight to the next timer, so the
//! reported instants are exactly the kernel's delays.

use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::Instant;

use super::*;

const S: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Event {
    Started {
        id: String,
        generation: u64,
        at: Instant,
        actor: ActorRef<TestMsg>,
    },
    Stopped {
        id: String,
        at: Instant,
    },
}

#[derive(Debug)]
enum TestMsg {
    Fail(Failure),
    Panic,
    StopSelf,
    /// Keeps the handler busy (and deaf to stop) for this long.
    Block(Duration),
    Beat,
}

struct TestChild;

struct TestArgs {
    id: String,
    generation: u64,
    probe: Probe,
    events: UnboundedSender<Event>,
}

impl Actor for TestChild {
    type Msg = TestMsg;
    type State = TestArgs;
    type Arguments = TestArgs;

    async fn pre_start(
        &self,
        _: ActorRef<TestMsg>,
        args: TestArgs,
    ) -> Result<TestArgs, ActorProcessingErr> {
        Ok(args)
    }

    async fn post_start(
        &self,
        myself: ActorRef<TestMsg>,
        s: &mut TestArgs,
    ) -> Result<(), ActorProcessingErr> {
        s.probe.set_ready(true);
        let _ = s.events.send(Event::Started {
            id: s.id.clone(),
            generation: s.generation,
            at: Instant::now(),
            actor: myself,
        });
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<TestMsg>,
        s: &mut TestArgs,
    ) -> Result<(), ActorProcessingErr> {
        let _ = s.events.send(Event::Stopped {
            id: s.id.clone(),
            at: Instant::now(),
        });
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<TestMsg>,
        msg: TestMsg,
        s: &mut TestArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TestMsg::Fail(f) => return Err(Box::new(f)),
            TestMsg::Panic => panic!("boom"),
            TestMsg::StopSelf => myself.stop(Some("done".into())),
            TestMsg::Block(d) => tokio::time::sleep(d).await,
            TestMsg::Beat => s.probe.beat(),
        }
        Ok(())
    }
}

fn policy() -> Policy {
    Policy {
        backoff: Backoff {
            initial: S,
            max: 8 * S,
            multiplier: 2.0,
            jitter: 0.0,
            reset_after: 30 * S,
        },
        max_restarts: 0,
        window: 60 * S,
        on_exhausted: Action::Park,
        on_fatal: Action::Park,
        liveness_timeout: None,
        shutdown_timeout: 2 * S,
        warn_after: 0,
    }
}

fn child(id: &str, restart: Restart, policy: Policy, events: &UnboundedSender<Event>) -> ChildSpec {
    let events = events.clone();
    let name = id.to_string();
    ChildSpec::new(id, "test", restart, move |ctx: ChildContext| {
        let args = TestArgs {
            id: name.clone(),
            generation: ctx.generation,
            probe: ctx.probe.clone(),
            events: events.clone(),
        };
        async move {
            let (actor, _) =
                Actor::spawn_linked(None, TestChild, args, ctx.supervisor.clone()).await?;
            Ok(actor.get_cell())
        }
    })
    .with_policy(policy)
}

struct Harness {
    tree: Tree,
    events: UnboundedReceiver<Event>,
}

impl Harness {
    async fn start(
        strategy: Strategy,
        specs: impl FnOnce(&UnboundedSender<Event>) -> Vec<ChildSpec>,
    ) -> Self {
        let (tx, events) = unbounded_channel();
        let options = TreeOptions {
            strategy,
            jitter: Jitter::fixed(0.0),
            exit: ExitHandle::new(),
        };
        let tree = Tree::start(specs(&tx), options).await.expect("tree starts");
        Self { tree, events }
    }

    async fn next(&mut self) -> Event {
        tokio::time::timeout(3600 * S, self.events.recv())
            .await
            .expect("an event within an hour of paused time")
            .expect("event channel open")
    }

    /// The next event, which must be the start of `id`; returns (generation, at, actor).
    async fn started(&mut self, id: &str) -> (u64, Instant, ActorRef<TestMsg>) {
        match self.next().await {
            Event::Started {
                id: got,
                generation,
                at,
                actor,
            } if got == id => (generation, at, actor),
            other => panic!("expected {id} to start, got {other:?}"),
        }
    }

    async fn stopped(&mut self, id: &str) -> Instant {
        match self.next().await {
            Event::Stopped { id: got, at, .. } if got == id => at,
            other => panic!("expected {id} to stop, got {other:?}"),
        }
    }

    /// Asserts nothing happens for `d` of paused time.
    async fn quiet_for(&mut self, d: Duration) {
        if let Ok(Some(e)) = tokio::time::timeout(d, self.events.recv()).await {
            panic!("expected no event for {d:?}, got {e:?}");
        }
    }

    fn node(&self, path: &str) -> NodeSnapshot {
        let snap = self.tree.handle().snapshot();
        snap.find(path)
            .cloned()
            .unwrap_or_else(|| panic!("no {path} in {}", snap.render_text()))
    }

    /// Lets queued messages be handled without moving the paused clock.
    async fn settle(&self) {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }
}

fn fail(actor: &ActorRef<TestMsg>, reason: &str) {
    actor
        .send_message(TestMsg::Fail(Failure::transient(reason)))
        .expect("child alive");
}

#[tokio::test(start_paused = true)]
async fn restarts_follow_exponential_backoff_and_reset_after_a_healthy_run() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, policy(), tx)]
    })
    .await;
    let (g, _, mut actor) = h.started("a").await;
    assert_eq!(g, 1);
    // Delays 1, 2, 4, 8 s, then capped at 8 s.
    for (expected_gen, delay) in [(2, 1), (3, 2), (4, 4), (5, 8), (6, 8)] {
        let failed_at = Instant::now();
        fail(&actor, "connection reset by peer");
        h.settle().await;
        let node = h.node("root/a");
        assert_eq!(node.state, NodeState::BackingOff);
        assert_eq!(node.next_restart_in_ms, Some(delay * 1000));
        assert_eq!(
            node.last_failure.as_ref().map(|f| f.reason.as_str()),
            Some("connection reset by peer")
        );
        let (g, at, next) = h.started("a").await;
        assert_eq!(g, expected_gen);
        assert_eq!(at - failed_at, S * delay as u32, "generation {g}");
        actor = next;
    }
    // A healthy run of reset_after (30 s) starts the sequence again from 1 s.
    tokio::time::sleep(30 * S).await;
    let failed_at = Instant::now();
    fail(&actor, "again");
    let (_, at, _) = h.started("a").await;
    assert_eq!(at - failed_at, S);
    let node = h.node("root/a");
    assert_eq!((node.restarts_total, node.consecutive_failures), (6, 1));
}

#[tokio::test(start_paused = true)]
async fn a_streak_of_warn_after_failures_is_named_in_the_tree_until_a_healthy_run() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        let policy = Policy {
            warn_after: 3,
            ..policy()
        };
        vec![
            child("approvals", Restart::Permanent, policy, tx)
                .with_label("approval handler for nova"),
        ]
    })
    .await;
    let (_, _, mut actor) = h.started("approvals").await;
    for failures in 1..=4u32 {
        fail(&actor, "handshake timeout");
        h.settle().await;
        let node = h.node("root/approvals");
        assert_eq!(node.consecutive_failures, failures);
        let expected = (failures >= 3).then(|| {
            format!("approval handler for nova failed {failures} times in a row: handshake timeout")
        });
        assert_eq!(node.warning, expected, "after {failures} failures");
        assert_eq!(
            node.render_text()
                .contains("WARNING: approval handler for nova failed"),
            failures >= 3
        );
        actor = h.started("approvals").await.2;
    }
    // A healthy run resets the streak, and the warning goes with it at the next failure.
    tokio::time::sleep(30 * S).await;
    fail(&actor, "once");
    h.settle().await;
    let node = h.node("root/approvals");
    assert_eq!((node.consecutive_failures, node.warning), (1, None));
}

#[tokio::test(start_paused = true)]
async fn panic_and_kill_count_as_transient() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Transient, policy(), tx)]
    })
    .await;
    let (_, _, actor) = h.started("a").await;
    actor.send_message(TestMsg::Panic).expect("alive");
    let (g, _, actor) = h.started("a").await;
    assert_eq!(g, 2);
    let f = h.node("root/a").last_failure.expect("failure recorded");
    assert_eq!((f.class.as_str(), f.reason.as_str()), ("transient", "boom"));
    actor.get_cell().kill();
    let (g, _, actor) = h.started("a").await;
    assert_eq!(g, 3);
    assert_eq!(
        h.node("root/a").last_failure.expect("failure").reason,
        "killed"
    );
    // A transient child that stops normally stays stopped.
    actor.send_message(TestMsg::StopSelf).expect("alive");
    h.stopped("a").await;
    h.quiet_for(60 * S).await;
    assert_eq!(h.node("root/a").state, NodeState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn permanent_child_that_stops_on_its_own_is_restarted() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, policy(), tx)]
    })
    .await;
    let (_, _, actor) = h.started("a").await;
    actor.send_message(TestMsg::StopSelf).expect("alive");
    h.stopped("a").await;
    let (g, _, _) = h.started("a").await;
    assert_eq!(g, 2);
    assert_eq!(
        h.node("root/a").last_failure.expect("failure").reason,
        "stopped on its own: done"
    );
}

#[tokio::test(start_paused = true)]
async fn fatal_failure_parks_without_restart_and_siblings_keep_running() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![
            child("a", Restart::Permanent, policy(), tx),
            child("b", Restart::Permanent, policy(), tx),
        ]
    })
    .await;
    let (_, _, a) = h.started("a").await;
    let (_, _, b) = h.started("b").await;
    a.send_message(TestMsg::Fail(Failure::fatal(
        "M_FORBIDDEN: invalid password",
    )))
    .expect("alive");
    h.quiet_for(120 * S).await;
    let node = h.node("root/a");
    assert_eq!(node.state, NodeState::Parked);
    assert_eq!(node.restarts_total, 0);
    let f = node.last_failure.expect("failure");
    assert_eq!(
        (f.class.as_str(), f.reason.as_str()),
        ("fatal", "M_FORBIDDEN: invalid password")
    );
    assert_eq!(h.node("root/b").state, NodeState::Running);
    assert_eq!(h.tree.handle().snapshot().not_ready(), ["root/a"]);
    // The sibling still restarts normally.
    fail(&b, "reset");
    let (g, _, _) = h.started("b").await;
    assert_eq!(g, 2);
    assert!(h.tree.exit().get().is_none());
}

#[tokio::test(start_paused = true)]
async fn budget_counts_failures_when_they_happen_despite_long_backoff() {
    // 2 failures per 100 s allowed; backoff 40 s fixed. Restarts would happen at 40 s and
    // 80 s after each failure, so a budget counted at respawn time would never see 3 in the
    // window; counted at failure time, the third failure (at ~80 s) spends it.
    let mut p = policy();
    p.max_restarts = 2;
    p.window = 100 * S;
    p.backoff.initial = 40 * S;
    p.backoff.max = 40 * S;
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, p, tx)]
    })
    .await;
    let (_, t0, a) = h.started("a").await;
    fail(&a, "one");
    let (_, t1, a) = h.started("a").await;
    assert_eq!(t1 - t0, 40 * S);
    fail(&a, "two");
    h.settle().await;
    assert_eq!(h.node("root/a").restarts_in_window, 2);
    let (_, t2, a) = h.started("a").await;
    assert_eq!(t2 - t0, 80 * S);
    fail(&a, "three");
    h.quiet_for(200 * S).await;
    let node = h.node("root/a");
    assert_eq!(node.state, NodeState::Parked);
    let reason = node.last_failure.expect("failure").reason;
    assert_eq!(reason, "three");
    assert_eq!(node.restarts_total, 2);
}

#[tokio::test(start_paused = true)]
async fn exhausted_budget_with_exit_asks_for_exit_code_75() {
    let mut p = policy();
    p.max_restarts = 1;
    p.on_exhausted = Action::Exit;
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("listener", Restart::Permanent, p, tx)]
    })
    .await;
    let (_, _, a) = h.started("listener").await;
    fail(&a, "address in use");
    let (_, _, a) = h.started("listener").await;
    assert!(h.tree.exit().get().is_none());
    fail(&a, "address in use");
    let request = tokio::time::timeout(S, h.tree.exit().requested())
        .await
        .expect("exit requested");
    assert_eq!(request.code, EXIT_BUDGET_EXHAUSTED);
    assert_eq!(request.path, "root/listener");
    assert!(
        request
            .reason
            .starts_with("restart budget spent: 2 failures within 60000 ms"),
        "{}",
        request.reason
    );
    // The program then shuts the tree down in order.
    let report = h.tree.shutdown(10 * S).await;
    assert!(report.graceful);
}

#[tokio::test(start_paused = true)]
async fn fatal_with_exit_asks_for_exit_code_78() {
    let mut p = policy();
    p.on_fatal = Action::Exit;
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("node", Restart::Permanent, p, tx)]
    })
    .await;
    let (_, _, a) = h.started("node").await;
    a.send_message(TestMsg::Fail(Failure::fatal("unauthorized")))
        .expect("alive");
    let request = tokio::time::timeout(S, h.tree.exit().requested())
        .await
        .expect("exit requested");
    assert_eq!(
        (request.code, request.reason.as_str()),
        (EXIT_FATAL, "fatal: unauthorized")
    );
}

#[tokio::test(start_paused = true)]
async fn escalate_fails_the_supervisor_to_its_parent() {
    let mut p = policy();
    p.max_restarts = 1;
    p.on_exhausted = Action::Escalate;
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![
            ChildSpec::supervisor(
                "sub",
                Strategy::OneForOne,
                vec![
                    child("a", Restart::Permanent, p, tx),
                    child("b", Restart::Permanent, policy(), tx),
                ],
            ),
            child("c", Restart::Permanent, policy(), tx),
        ]
    })
    .await;
    let (_, _, a) = h.started("a").await;
    h.started("b").await;
    h.started("c").await;
    fail(&a, "x");
    let (_, _, a) = h.started("a").await;
    let failed_at = Instant::now();
    fail(&a, "x");
    // The sub-supervisor stops its children in reverse order, fails, and the root restarts it
    // after the supervisor's own backoff (100 ms): both children come back as generation 1
    // of a new supervisor incarnation.
    h.stopped("b").await;
    let (g, at, _) = h.started("a").await;
    assert_eq!(g, 1);
    assert_eq!(at - failed_at, Duration::from_millis(100));
    h.started("b").await;
    let sub = h.node("root/sub");
    assert_eq!(
        (sub.generation, sub.restarts_total, sub.state),
        (2, 1, NodeState::Running)
    );
    let reason = sub.last_failure.expect("failure").reason;
    assert!(
        reason.starts_with("root/sub/a gave up: restart budget spent"),
        "{reason}"
    );
    // The sibling of the supervisor was untouched.
    assert_eq!(h.node("root/c").generation, 1);
}

#[tokio::test(start_paused = true)]
async fn one_for_all_restarts_every_sibling_in_start_order() {
    let mut h = Harness::start(Strategy::OneForAll, |tx| {
        ["a", "b", "c"]
            .iter()
            .map(|id| child(id, Restart::Permanent, policy(), tx))
            .collect()
    })
    .await;
    h.started("a").await;
    let (_, _, b) = h.started("b").await;
    h.started("c").await;
    let failed_at = Instant::now();
    fail(&b, "boom");
    // Siblings stop in reverse start order, then all start again in start order after b's
    // backoff.
    h.stopped("c").await;
    h.stopped("a").await;
    for id in ["a", "b", "c"] {
        let (g, at, _) = h.started(id).await;
        assert_eq!((g, at - failed_at), (2, S), "{id}");
    }
    assert_eq!(h.node("root/b").consecutive_failures, 1);
    assert_eq!(h.node("root/a").consecutive_failures, 0);
    assert_eq!(h.node("root/a").restarts_total, 1);
}

#[tokio::test(start_paused = true)]
async fn rest_for_one_restarts_only_the_later_siblings() {
    let mut h = Harness::start(Strategy::RestForOne, |tx| {
        ["a", "b", "c"]
            .iter()
            .map(|id| child(id, Restart::Permanent, policy(), tx))
            .collect()
    })
    .await;
    h.started("a").await;
    let (_, _, b) = h.started("b").await;
    h.started("c").await;
    fail(&b, "boom");
    h.stopped("c").await;
    let (g, _, _) = h.started("b").await;
    assert_eq!(g, 2);
    let (g, _, _) = h.started("c").await;
    assert_eq!(g, 2);
    h.quiet_for(60 * S).await;
    assert_eq!(h.node("root/a").generation, 1);
}

#[tokio::test(start_paused = true)]
async fn stop_during_backoff_cancels_the_pending_restart() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, policy(), tx)]
    })
    .await;
    let (_, _, a) = h.started("a").await;
    fail(&a, "boom");
    h.settle().await;
    assert_eq!(h.node("root/a").state, NodeState::BackingOff);
    h.tree
        .handle()
        .control("root/a", ControlAction::Stop)
        .await
        .expect("stop");
    h.quiet_for(600 * S).await;
    let node = h.node("root/a");
    assert_eq!((node.state, node.generation), (NodeState::Stopped, 1));
    // Start brings it back at once, with a fresh budget.
    let asked = Instant::now();
    h.tree
        .handle()
        .control("root/a", ControlAction::Start)
        .await
        .expect("start");
    let (g, at, _) = h.started("a").await;
    assert_eq!((g, at), (2, asked));
    assert_eq!(h.node("root/a").consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn operator_restart_is_not_a_failure_and_its_stale_exit_is_ignored() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, policy(), tx)]
    })
    .await;
    h.started("a").await;
    h.tree
        .handle()
        .control("root/a", ControlAction::Restart)
        .await
        .expect("restart");
    // post_stop of generation 1 then start of generation 2; the old incarnation's
    // termination event arrives after it was replaced and must not trigger another restart.
    h.stopped("a").await;
    let (g, _, _) = h.started("a").await;
    assert_eq!(g, 2);
    h.quiet_for(600 * S).await;
    let node = h.node("root/a");
    assert_eq!(
        (node.generation, node.restarts_total, node.state),
        (2, 0, NodeState::Running)
    );
    assert!(node.last_failure.is_none());
}

#[tokio::test(start_paused = true)]
async fn operator_kill_is_a_failure_and_start_revives_a_parked_child() {
    let mut p = policy();
    p.max_restarts = 1;
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, p, tx)]
    })
    .await;
    h.started("a").await;
    let handle = h.tree.handle();
    handle
        .control("root/a", ControlAction::Kill)
        .await
        .expect("kill");
    let (g, _, _) = h.started("a").await;
    assert_eq!(g, 2);
    assert_eq!(
        h.node("root/a").last_failure.expect("f").reason,
        "killed by operator"
    );
    handle
        .control("root/a", ControlAction::Kill)
        .await
        .expect("kill");
    h.quiet_for(60 * S).await;
    assert_eq!(h.node("root/a").state, NodeState::Parked);
    // Kill of a parked child is refused; start revives it with a fresh budget.
    let err = handle
        .control("root/a", ControlAction::Kill)
        .await
        .expect_err("not running");
    assert!(matches!(err, SupervisorError::Conflict { .. }), "{err}");
    handle
        .control("root/a", ControlAction::Start)
        .await
        .expect("start");
    let (g, _, _) = h.started("a").await;
    assert_eq!(g, 3);
    handle
        .control("root/a", ControlAction::Kill)
        .await
        .expect("kill");
    let (g, _, _) = h.started("a").await;
    assert_eq!(g, 4, "budget was reset by start");
    assert_eq!(
        handle.control("root/nope", ControlAction::Stop).await,
        Err(SupervisorError::UnknownChild("root/nope".to_string()))
    );
    assert!(matches!(
        handle.control("root", ControlAction::Stop).await,
        Err(SupervisorError::Conflict { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn hung_child_is_killed_at_its_liveness_timeout_and_restarted() {
    let mut p = policy();
    p.liveness_timeout = Some(10 * S);
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, p, tx)]
    })
    .await;
    let (_, t0, a) = h.started("a").await;
    // Beats keep it alive past its timeout…
    for _ in 0..5 {
        tokio::time::sleep(6 * S).await;
        a.send_message(TestMsg::Beat).expect("alive");
    }
    // …then it goes silent: killed 10 s after its last beat (at 30 s), restarted 1 s later.
    let (g, at, _) = h.started("a").await;
    assert_eq!(g, 2);
    assert_eq!(at - t0, 41 * S);
    let f = h.node("root/a").last_failure.expect("failure");
    assert_eq!(
        (f.class.as_str(), f.reason.as_str()),
        ("hung", "no heartbeat for 10000 ms")
    );
}

#[tokio::test(start_paused = true)]
async fn a_liveness_timeout_set_through_the_cell_applies_to_a_running_child() {
    let cell = PolicyCell::new(policy());
    let spec_cell = cell.clone();
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, policy(), tx).with_policy_cell(spec_cell)]
    })
    .await;
    let (_, t0, _silent) = h.started("a").await;
    // No timeout: a silent child runs on.
    h.quiet_for(150 * S).await;
    // A 10 s timeout from now on: the running child is found silent at its next check
    // (every 60 s at most: at 180 s), killed, and restarted 1 s later.
    cell.set(Policy {
        liveness_timeout: Some(10 * S),
        ..policy()
    });
    let (g, at, _) = h.started("a").await;
    assert_eq!((g, at - t0), (2, 181 * S));
    let f = h.node("root/a").last_failure.expect("failure");
    assert_eq!(f.class.as_str(), "hung");
}

#[tokio::test(start_paused = true)]
async fn ordered_shutdown_kills_a_child_that_ignores_stop_after_its_timeout() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        ["a", "b", "c"]
            .iter()
            .map(|id| child(id, Restart::Permanent, policy(), tx))
            .collect()
    })
    .await;
    h.started("a").await;
    let (_, _, b) = h.started("b").await;
    h.started("c").await;
    b.send_message(TestMsg::Block(3600 * S)).expect("alive");
    h.settle().await;
    let t0 = Instant::now();
    let tree = h.tree;
    let shutdown = tokio::spawn(async move { (tree.shutdown(60 * S).await, Instant::now()) });
    let mut events = h.events;
    let mut order = Vec::new();
    while let Some(e) = events.recv().await {
        if let Event::Stopped { id, at, .. } = e {
            order.push((id, at - t0));
        }
    }
    // c stops at once; b never runs post_stop (killed after its 2 s timeout); a stops then.
    assert_eq!(
        order,
        [("c".to_string(), Duration::ZERO), ("a".to_string(), 2 * S)]
    );
    let (report, done) = shutdown.await.expect("joined");
    assert!(report.graceful);
    assert_eq!(done - t0, 2 * S);
}

#[tokio::test(start_paused = true)]
async fn shutdown_is_recursive_and_in_reverse_start_order() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![
            child("a", Restart::Permanent, policy(), tx),
            ChildSpec::supervisor(
                "sub",
                Strategy::OneForOne,
                vec![
                    child("x", Restart::Permanent, policy(), tx),
                    child("y", Restart::Permanent, policy(), tx),
                ],
            ),
            child("z", Restart::Permanent, policy(), tx),
        ]
    })
    .await;
    for id in ["a", "x", "y", "z"] {
        h.started(id).await;
    }
    let report = h.tree.shutdown(60 * S).await;
    assert!(report.graceful);
    for id in ["z", "y", "x", "a"] {
        h.stopped(id).await;
    }
    let snap = h.tree.handle().snapshot();
    assert_eq!(snap.state, NodeState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_temporary_children_together() {
    let (tx, mut events) = unbounded_channel();
    let tree = Tree::start(
        vec![ChildSpec::supervisor(
            "sessions",
            Strategy::OneForOne,
            vec![],
        )],
        TreeOptions {
            jitter: Jitter::fixed(0.0),
            ..TreeOptions::default()
        },
    )
    .await
    .expect("tree");
    let sessions = tree
        .handle()
        .supervisor("root/sessions")
        .expect("supervisor");
    for i in 0..50 {
        sessions
            .add(child(
                &format!("conn-{i}"),
                Restart::Temporary,
                policy(),
                &tx,
            ))
            .await
            .expect("added");
    }
    // Every session is busy and deaf to stop: each is killed after its 2 s timeout, all at once.
    for _ in 0..50 {
        if let Some(Event::Started { actor, .. }) = events.recv().await {
            actor.send_message(TestMsg::Block(3600 * S)).expect("alive");
        }
    }
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    assert!(tree.shutdown(60 * S).await.graceful);
    assert_eq!(
        Instant::now() - t0,
        2 * S,
        "50 sessions cost one shutdown timeout, not fifty"
    );
}

#[tokio::test(start_paused = true)]
async fn a_policy_changed_through_its_cell_decides_the_next_failure_without_a_restart() {
    let cell = PolicyCell::new(policy());
    let spec_cell = cell.clone();
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![child("a", Restart::Permanent, policy(), tx).with_policy_cell(spec_cell)]
    })
    .await;
    let (_, _, actor) = h.started("a").await;
    // A new policy: 5 s first delay. Nothing restarts for it.
    let slower = Policy {
        backoff: Backoff {
            initial: 5 * S,
            ..policy().backoff
        },
        ..policy()
    };
    assert!(cell.set(slower.clone()));
    assert!(!cell.set(slower), "the same policy again is no change");
    h.quiet_for(60 * S).await;
    assert_eq!(h.node("root/a").generation, 1);
    // The next failure waits the new 5 s, not the 1 s the child started with.
    let failed_at = Instant::now();
    fail(&actor, "reset");
    let (g, at, _) = h.started("a").await;
    assert_eq!((g, at - failed_at), (2, 5 * S));
}

#[tokio::test(start_paused = true)]
async fn a_supervisor_restarts_with_its_child_set_as_changed_since() {
    let (tx, mut events) = unbounded_channel();
    let set = ChildSet::new(vec![child("a", Restart::Permanent, policy(), &tx)]);
    let tree = Tree::start(
        vec![
            ChildSpec::supervisor_of("group", Strategy::OneForOne, set.clone())
                .with_policy(policy()),
        ],
        TreeOptions {
            jitter: Jitter::fixed(0.0),
            ..TreeOptions::default()
        },
    )
    .await
    .expect("tree");
    let ids = |t: &Tree| -> Vec<String> {
        t.handle()
            .snapshot()
            .find("root/group")
            .map(|n| n.children.iter().map(|c| c.id.to_string()).collect())
            .unwrap_or_default()
    };
    // A child added to the set and to the running supervisor; one removed from both.
    let group = tree.handle().supervisor("root/group").expect("group");
    set.put(child("b", Restart::Permanent, policy(), &tx));
    group
        .add(child("b", Restart::Permanent, policy(), &tx))
        .await
        .expect("b added");
    assert!(set.remove("a"));
    group.remove("a").await.expect("a removed");
    assert_eq!(ids(&tree), ["b"]);
    // Restarted, the supervisor starts the set as it is now: b, not a.
    tree.handle()
        .control("root/group", ControlAction::Restart)
        .await
        .expect("restart");
    tokio::time::sleep(S).await;
    assert_eq!(ids(&tree), ["b"]);
    let mut started = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let Event::Started { id, .. } = event {
            started.push(id);
        }
    }
    assert_eq!(started, ["a", "b", "b"]);
}

#[tokio::test(start_paused = true)]
async fn dynamic_children_are_added_removed_and_temporary_ones_vanish_on_exit() {
    let (tx, mut events) = unbounded_channel();
    let tree = Tree::start(
        vec![ChildSpec::supervisor(
            "sessions",
            Strategy::OneForOne,
            vec![],
        )],
        TreeOptions {
            jitter: Jitter::fixed(0.0),
            ..TreeOptions::default()
        },
    )
    .await
    .expect("tree");
    let sessions = tree
        .handle()
        .supervisor("root/sessions")
        .expect("supervisor");
    sessions
        .add(child("conn-1", Restart::Temporary, policy(), &tx))
        .await
        .expect("added");
    sessions
        .add(child("conn-2", Restart::Temporary, policy(), &tx))
        .await
        .expect("added");
    let dup = sessions
        .add(child("conn-2", Restart::Temporary, policy(), &tx))
        .await;
    assert!(matches!(dup, Err(SupervisorError::Conflict { .. })));
    let mut actors = Vec::new();
    for _ in 0..2 {
        if let Some(Event::Started { actor, .. }) = events.recv().await {
            actors.push(actor);
        }
    }
    let ids = |t: &Tree| -> Vec<String> {
        t.handle()
            .snapshot()
            .find("root/sessions")
            .map(|n| n.children.iter().map(|c| c.id.to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(ids(&tree), ["conn-1", "conn-2"]);
    // A temporary child that fails is not restarted and leaves the tree.
    fail(&actors[0], "peer went away");
    tokio::time::sleep(60 * S).await;
    assert_eq!(ids(&tree), ["conn-2"]);
    sessions.remove("conn-2").await.expect("removed");
    assert!(ids(&tree).is_empty());
    assert!(matches!(
        sessions.remove("conn-2").await,
        Err(SupervisorError::UnknownChild(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn failed_start_goes_through_the_same_decision() {
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counter = attempts.clone();
    let spec = ChildSpec::new(
        "flaky",
        "test",
        Restart::Permanent,
        move |_ctx: ChildContext| {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                let err: ActorProcessingErr = if n < 2 {
                    Box::new(Failure::transient(format!("bind failed #{n}")))
                } else {
                    Box::new(Failure::fatal("bad config"))
                };
                Err(ractor::SpawnErr::StartupFailed(err))
            }
        },
    )
    .with_policy(policy());
    let tree = Tree::start(
        vec![spec],
        TreeOptions {
            jitter: Jitter::fixed(0.0),
            ..TreeOptions::default()
        },
    )
    .await
    .expect("tree");
    tokio::time::sleep(10 * S).await;
    let node = tree
        .handle()
        .snapshot()
        .find("root/flaky")
        .cloned()
        .expect("node");
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(
        (node.state, node.restarts_total, node.generation),
        (NodeState::Parked, 2, 3)
    );
    assert_eq!(node.last_failure.expect("f").reason, "bad config");
}

#[tokio::test(start_paused = true)]
async fn snapshot_reports_uptime_readiness_and_renders() {
    let mut h = Harness::start(Strategy::OneForOne, |tx| {
        vec![
            child("a", Restart::Permanent, policy(), tx),
            child("b", Restart::Permanent, policy(), tx).reports_readiness(),
        ]
    })
    .await;
    h.started("a").await;
    h.started("b").await;
    tokio::time::sleep(5 * S).await;
    let snap = h.tree.handle().snapshot();
    let a = snap.find("root/a").expect("a");
    assert_eq!(a.uptime_ms, Some(5000));
    assert!(
        a.ready && snap.find("root/b").expect("b").ready,
        "TestChild reports ready in post_start"
    );
    let text = snap.render_text();
    assert!(
        text.starts_with("root  running  permanent  one_for_one"),
        "{text}"
    );
    assert!(
        text.contains("├── a  running  permanent  [test]  gen 1  up 5.0s"),
        "{text}"
    );
    let json = serde_json::to_value(&snap).expect("json");
    assert_eq!(json["children"][1]["state"], "running");
    assert_eq!(json["children"][0]["uptime_ms"], 5000);
}

mod slots {
    //! Start-slot pools.

    use std::collections::VecDeque;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn pool(max: usize, jitter_ms: u64, hold_ms: u64) -> Vec<(String, PoolSettings)> {
        vec![(
            "p".to_string(),
            PoolSettings {
                max_concurrent: max,
                jitter: Duration::from_millis(jitter_ms),
                hold_timeout: Duration::from_millis(hold_ms),
            },
        )]
    }

    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn grants_in_fifo_order_and_never_more_than_max() {
        let (client, _actor) = SlotClient::spawn_standalone(pool(2, 0, 60_000), Jitter::fixed(0.0))
            .await
            .expect("spawn");
        let (tx, mut rx) = unbounded_channel();
        let mut tasks = Vec::new();
        for i in 0..6 {
            let (client, tx) = (client.clone(), tx.clone());
            tasks.push(tokio::spawn(async move {
                let guard = client
                    .acquire("p", &format!("w{i}"), false)
                    .await
                    .expect("slot");
                tx.send((i, Instant::now())).expect("send");
                tokio::time::sleep(S).await;
                drop(guard);
            }));
            settle().await; // queue in index order
        }
        let t0 = Instant::now();
        let mut got = Vec::new();
        for _ in 0..6 {
            let (i, at) = rx.recv().await.expect("grant");
            got.push((i, (at - t0).as_secs()));
        }
        assert_eq!(got, [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]);
        assert_eq!(
            client
                .acquire("nope", "x", false)
                .await
                .expect_err("unknown pool"),
            SlotError::UnknownPool("nope".to_string())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_reconfigured_in_place_keeps_its_holders_and_admits_its_queue() {
        let (client, _actor) = SlotClient::spawn_standalone(pool(1, 0, 60_000), Jitter::fixed(0.0))
            .await
            .expect("spawn");
        let holder = client.acquire("p", "holder", false).await.expect("slot");
        let waiter = {
            let c = client.clone();
            tokio::spawn(async move { c.acquire("p", "waiter", false).await })
        };
        settle().await;
        assert!(!waiter.is_finished(), "a pool of one admitted two");
        // Two slots now: the waiter is admitted at once, the holder keeps its slot.
        client.configure(pool(2, 0, 60_000));
        let second = tokio::time::timeout(S, waiter)
            .await
            .expect("admitted at once")
            .expect("task")
            .expect("slot");
        let third = {
            let c = client.clone();
            tokio::spawn(async move { c.acquire("p", "third", false).await })
        };
        settle().await;
        assert!(!third.is_finished(), "a pool of two admitted three");
        drop((holder, second));
        tokio::time::timeout(S, third)
            .await
            .expect("admitted once a slot is free")
            .expect("task")
            .expect("slot");
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_delays_only_first_starts() {
        // Draws are fixed at 0.5: a first start waits exactly half the 2 s jitter.
        let (client, _actor) =
            SlotClient::spawn_standalone(pool(3, 2000, 60_000), Jitter::fixed(0.5))
                .await
                .expect("spawn");
        let t0 = Instant::now();
        let first = client.acquire("p", "a", true).await.expect("slot");
        assert_eq!(Instant::now() - t0, Duration::from_millis(1000));
        let t1 = Instant::now();
        let restart = client.acquire("p", "a", false).await.expect("slot");
        assert_eq!(Instant::now() - t1, Duration::ZERO);
        drop((first, restart));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelled_waiters_are_skipped_and_use_no_turn() {
        let (client, _actor) =
            SlotClient::spawn_standalone(pool(1, 1000, 60_000), Jitter::fixed(0.5))
                .await
                .expect("spawn");
        let holder = client.acquire("p", "holder", false).await.expect("slot");
        // One waiter queued, one still jittering (first start): both give up.
        let queued = {
            let c = client.clone();
            tokio::spawn(async move { c.acquire("p", "queued", false).await })
        };
        let jittering = {
            let c = client.clone();
            tokio::spawn(async move { c.acquire("p", "jittering", true).await })
        };
        settle().await;
        queued.abort();
        jittering.abort();
        let next = {
            let c = client.clone();
            tokio::spawn(async move {
                c.acquire("p", "next", false)
                    .await
                    .map(|g| (g, Instant::now()))
            })
        };
        settle().await;
        tokio::time::sleep(2 * S).await; // the jitter timer fires; its waiter is gone
        let released_at = Instant::now();
        holder.release();
        let (_guard, at) = next.await.expect("joined").expect("slot");
        assert_eq!(
            at, released_at,
            "the next live waiter gets the slot at once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hold_timeout_force_releases() {
        let (client, _actor) = SlotClient::spawn_standalone(pool(1, 0, 5000), Jitter::fixed(0.0))
            .await
            .expect("spawn");
        let t0 = Instant::now();
        let _stuck = client
            .acquire("p", "root/stuck", false)
            .await
            .expect("slot");
        let _next = client
            .acquire("p", "root/next", false)
            .await
            .expect("slot after the hold timeout");
        assert_eq!(Instant::now() - t0, 5 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn each_holder_is_released_at_its_own_hold_deadline() {
        let (client, _actor) = SlotClient::spawn_standalone(pool(2, 0, 5000), Jitter::fixed(0.0))
            .await
            .expect("spawn");
        let t0 = Instant::now();
        let _a = client.acquire("p", "a", false).await.expect("slot");
        tokio::time::sleep(2 * S).await;
        let _b = client.acquire("p", "b", false).await.expect("slot");
        // Both slots held: c waits for a's deadline (5 s), d for b's (7 s).
        let _c = client.acquire("p", "c", false).await.expect("slot");
        assert_eq!(Instant::now() - t0, 5 * S);
        let _d = client.acquire("p", "d", false).await.expect("slot");
        assert_eq!(Instant::now() - t0, 7 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn release_on_holder_panic_and_release_is_idempotent() {
        let (client, _actor) =
            SlotClient::spawn_standalone(pool(1, 0, 600_000), Jitter::fixed(0.0))
                .await
                .expect("spawn");
        let c = client.clone();
        let panicker = tokio::spawn(async move {
            let _guard = c.acquire("p", "panicker", false).await.expect("slot");
            panic!("holder died");
        });
        assert!(panicker.await.is_err());
        let t0 = Instant::now();
        let g = client
            .acquire("p", "after", false)
            .await
            .expect("slot freed by the panic");
        assert_eq!(Instant::now(), t0);
        // Releasing twice (drop after an explicit release of a stale lease) frees one slot only.
        g.release();
        let a = client.acquire("p", "a", false).await.expect("slot");
        let c = client.clone();
        let b = tokio::spawn(async move { c.acquire("p", "b", false).await });
        settle().await;
        assert!(!b.is_finished(), "only one holder at a time");
        drop(a);
        b.await.expect("joined").expect("slot");
    }

    #[tokio::test(start_paused = true)]
    async fn slot_held_by_an_actor_is_released_when_the_actor_is_killed() {
        struct Holder;
        impl Actor for Holder {
            type Msg = ();
            type State = SlotGuard;
            type Arguments = SlotClient;
            async fn pre_start(
                &self,
                _: ActorRef<()>,
                c: SlotClient,
            ) -> Result<SlotGuard, ActorProcessingErr> {
                Ok(c.acquire("p", "actor", false).await?)
            }
        }
        let (client, _actor) =
            SlotClient::spawn_standalone(pool(1, 0, 600_000), Jitter::fixed(0.0))
                .await
                .expect("spawn");
        let (holder, _) = Actor::spawn(None, Holder, client.clone())
            .await
            .expect("holder");
        holder.get_cell().kill();
        let t0 = Instant::now();
        let _g = client.acquire("p", "next", false).await.expect("freed");
        assert_eq!(Instant::now(), t0);
    }

    /// Random interleavings of acquire, cancel, release and holder panic: the number of
    /// live guards never exceeds `max_concurrent`, grants follow arrival order, and every
    /// live waiter is eventually served.
    #[tokio::test(start_paused = true)]
    async fn property_random_sequences_keep_the_bound_and_fifo() {
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let max = rng.random_range(1..4usize);
            let (client, actor) =
                SlotClient::spawn_standalone(pool(max, 0, 600_000), Jitter::fixed(0.0))
                    .await
                    .expect("spawn");
            let live = Arc::new(AtomicUsize::new(0));
            let peak = Arc::new(AtomicUsize::new(0));
            let (order_tx, mut order_rx) = unbounded_channel::<usize>();
            let mut waiting: VecDeque<(usize, tokio::task::JoinHandle<()>)> = VecDeque::new();
            let mut holders: Vec<tokio::sync::oneshot::Sender<bool>> = Vec::new();
            let mut cancelled = std::collections::HashSet::new();
            let (hold_tx, mut hold_rx) = unbounded_channel::<tokio::sync::oneshot::Sender<bool>>();
            for step in 0..60 {
                match rng.random_range(0..4) {
                    0 | 1 => {
                        let (client, live, peak, order_tx, hold_tx) = (
                            client.clone(),
                            live.clone(),
                            peak.clone(),
                            order_tx.clone(),
                            hold_tx.clone(),
                        );
                        let task = tokio::spawn(async move {
                            let guard = client
                                .acquire("p", &format!("w{step}"), false)
                                .await
                                .expect("slot");
                            // Counts this holder until the task ends, also when aborted.
                            struct Live(Arc<AtomicUsize>);
                            impl Drop for Live {
                                fn drop(&mut self) {
                                    self.0.fetch_sub(1, Ordering::SeqCst);
                                }
                            }
                            let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                            let _live = Live(live.clone());
                            peak.fetch_max(now, Ordering::SeqCst);
                            let _ = order_tx.send(step);
                            let (tx, rx) = tokio::sync::oneshot::channel();
                            let _ = hold_tx.send(tx);
                            let panic = rx.await.unwrap_or(false);
                            drop(_live);
                            if panic {
                                panic!("holder {step} panics");
                            }
                            drop(guard);
                        });
                        waiting.push_back((step, task));
                    }
                    2 => {
                        if let Some((step, task)) = waiting.pop_back()
                            && !task.is_finished()
                        {
                            task.abort();
                            cancelled.insert(step);
                        }
                    }
                    _ => {
                        if !holders.is_empty() {
                            let i = rng.random_range(0..holders.len());
                            let _ = holders.swap_remove(i).send(rng.random_bool(0.3));
                        }
                    }
                }
                settle().await;
                while let Ok(h) = hold_rx.try_recv() {
                    holders.push(h);
                }
                assert!(
                    live.load(Ordering::SeqCst) <= max,
                    "seed {seed} step {step}"
                );
            }
            // Drain: release everyone still holding until all live waiters were served.
            loop {
                settle().await;
                while let Ok(h) = hold_rx.try_recv() {
                    holders.push(h);
                }
                if holders.is_empty() {
                    break;
                }
                for h in holders.drain(..) {
                    let _ = h.send(false);
                }
            }
            drop(order_tx);
            let mut grants = Vec::new();
            while let Some(step) = order_rx.recv().await {
                grants.push(step);
            }
            let mut sorted = grants.clone();
            sorted.sort_unstable();
            assert_eq!(grants, sorted, "seed {seed}: grants out of arrival order");
            let expected: Vec<usize> = waiting
                .iter()
                .map(|(s, _)| *s)
                .filter(|s| !cancelled.contains(s))
                .collect();
            for s in &expected {
                assert!(grants.contains(s), "seed {seed}: waiter {s} never served");
            }
            assert!(peak.load(Ordering::SeqCst) <= max);
            actor.stop(None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pools_appear_in_the_tree_snapshot() {
        let client = SlotClient::new();
        let tree = Tree::start(
            vec![client.spec("start_slots", pool(2, 0, 600_000))],
            TreeOptions {
                jitter: Jitter::fixed(0.0),
                ..TreeOptions::default()
            },
        )
        .await
        .expect("tree");
        settle().await;
        let _a = client.acquire("p", "root/x", false).await.expect("slot");
        tokio::time::sleep(S).await;
        let snap = tree.handle().snapshot();
        let pools = &snap.find("root/start_slots").expect("node").pools;
        assert_eq!(pools.len(), 1);
        assert_eq!(
            pools[0].holders,
            [HolderSnapshot {
                holder: "root/x".to_string(),
                held_ms: 1000
            }]
        );
        assert_eq!(
            (
                pools[0].max_concurrent,
                pools[0].peak_holders,
                pools[0].queue_len
            ),
            (2, 1, 0)
        );
        assert!(
            snap.render_text()
                .contains("pool p: 1/2 held [root/x 1.0s], 0 queued"),
            "{}",
            snap.render_text()
        );
    }
}
