"""The conversation table: an LRU bounded in age (ttl) and size (max).

Time is passed in, so these tests are plain synchronous code.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from relayd.conversations import TURNS_KEPT, Conversations


def table(ttl: float = 100.0, limit: int = 10) -> Conversations:
    return Conversations(ttl=ttl, limit=limit)


def test_record_and_get() -> None:
    conversations = table()
    conversations.record("c1", agent_id="a", user_id="u", response_id="r1", now=0)
    entry = conversations.get("c1", now=5)
    assert entry is not None
    assert (entry.agent_id, entry.user_id, entry.last_response_id, entry.last_used) == (
        "a",
        "u",
        "r1",
        5,
    )
    assert conversations.get("nope", now=5) is None
    conversations.record("c1", agent_id="a", user_id="u", response_id="r2", now=6)
    entry = conversations.get("c1", now=7)
    assert entry is not None
    assert entry.last_response_id == "r2"
    assert len(conversations) == 1


def test_ttl_expiry_counts_from_the_last_use() -> None:
    conversations = table(ttl=10)
    conversations.record("c1", agent_id="a", user_id="u", response_id="r1", now=0)
    conversations.record("c2", agent_id="a", user_id="u", response_id="r2", now=0)
    assert conversations.get("c1", now=9) is not None  # used at 9: lives until 19
    assert conversations.get("c1", now=19) is not None  # exactly ttl after the last use
    assert conversations.get("c2", now=19) is None  # last used at 0
    assert len(conversations) == 1
    assert conversations.get("c1", now=29.5) is None
    assert len(conversations) == 0
    assert conversations.count_for("a") == 0


def test_expire_drops_only_the_old() -> None:
    conversations = table(ttl=10)
    for n in range(5):
        conversations.record(f"c{n}", agent_id="a", user_id="u", response_id=f"r{n}", now=n * 5)
    conversations.expire(now=19)  # c0 (0) and c1 (5) are more than 10 old; c2 (10) is not
    assert len(conversations) == 3
    assert conversations.get("c1", now=19) is None
    assert conversations.get("c2", now=19) is not None
    assert conversations.count_for("a") == 3


def test_max_evicts_the_least_recently_used() -> None:
    conversations = table(limit=3)
    for n in range(3):
        conversations.record(f"c{n}", agent_id="a", user_id="u", response_id=f"r{n}", now=n)
    assert conversations.get("c0", now=3) is not None  # c0 is now the most recent
    conversations.record("c3", agent_id="b", user_id="u", response_id="r3", now=4)
    assert len(conversations) == 3
    assert conversations.evicted == 1
    assert conversations.get("c1", now=5) is None  # the least recently used went
    for kept in ("c0", "c2", "c3"):
        assert conversations.get(kept, now=5) is not None
    assert conversations.count_for("a") == 2
    assert conversations.count_for("b") == 1


def test_refreshing_an_entry_does_not_evict() -> None:
    conversations = table(limit=2)
    conversations.record("c1", agent_id="a", user_id="u", response_id="r1", now=0)
    conversations.record("c2", agent_id="a", user_id="u", response_id="r2", now=1)
    conversations.record("c1", agent_id="a", user_id="u", response_id="r1b", now=2)
    assert len(conversations) == 2
    assert conversations.evicted == 0
    conversations.record("c3", agent_id="a", user_id="u", response_id="r3", now=3)
    assert conversations.get("c2", now=4) is None  # c1 was refreshed after c2
    assert conversations.get("c1", now=4) is not None


def test_per_agent_counts() -> None:
    conversations = table(ttl=10, limit=100)
    for n in range(3):
        conversations.record(f"a{n}", agent_id="a", user_id="u", response_id=f"ra{n}", now=0)
    conversations.record("b0", agent_id="b", user_id="u", response_id="rb0", now=5)
    assert conversations.count_for("a") == 3
    assert conversations.count_for("b") == 1
    assert conversations.count_for("nobody") == 0
    conversations.record("b1", agent_id="b", user_id="u", response_id="rb1", now=6)
    assert conversations.count_for("b") == 2
    conversations.expire(now=12)  # a0-a2 last used at 0
    assert conversations.count_for("a") == 0
    assert conversations.count_for("b") == 2


def test_configure_applies_to_the_next_decision() -> None:
    conversations = table(ttl=100, limit=10)
    for n in range(5):
        conversations.record(f"c{n}", agent_id="a", user_id="u", response_id=f"r{n}", now=n)
    conversations.configure(ttl=1, limit=3)
    conversations.record("c5", agent_id="a", user_id="u", response_id="r5", now=5)
    assert len(conversations) <= 3
    assert conversations.get("c5", now=5) is not None
    assert conversations.get("c0", now=5) is None


# -- ownership: a reply never moves a conversation or claims another's turn ----------


def test_a_reply_from_another_agent_does_not_move_a_conversation() -> None:
    conversations = table()
    assert conversations.record("c1", agent_id="a", user_id="u", response_id="r1", now=0) is None
    problem = conversations.record("c1", agent_id="b", user_id="u", response_id="r2", now=1)
    assert problem is not None and "another agent" in problem
    entry = conversations.get("c1", now=2)
    assert entry is not None
    assert (entry.agent_id, entry.last_response_id) == ("a", "r1")
    assert conversations.turn("r2", now=2) is None
    assert (conversations.count_for("a"), conversations.count_for("b")) == (1, 0)


def test_a_reply_for_another_user_does_not_take_their_conversation() -> None:
    conversations = table()
    conversations.record("c1", agent_id="a", user_id="victim", response_id="r1", now=0)
    problem = conversations.record("c1", agent_id="a", user_id="mallory", response_id="r2", now=1)
    assert problem is not None and "another user's" in problem
    entry = conversations.get("c1", now=2)
    assert entry is not None
    assert (entry.user_id, entry.last_response_id) == ("victim", "r1")
    assert conversations.turn("r2", now=2) is None


def test_an_expired_conversation_is_no_ones() -> None:
    conversations = table(ttl=10)
    conversations.record("c1", agent_id="a", user_id="u", response_id="r1", now=0)
    assert conversations.record("c1", agent_id="b", user_id="v", response_id="r2", now=11) is None
    entry = conversations.get("c1", now=12)
    assert entry is not None and (entry.agent_id, entry.user_id) == ("b", "v")


def test_the_admin_key_continues_any_users_conversation_which_keeps_its_owner() -> None:
    conversations = table()
    conversations.record("c1", agent_id="a", user_id="u", response_id="r1", now=0)
    problem = conversations.record(
        "c1", agent_id="a", user_id="admin", response_id="r2", now=1, any_user=True
    )
    assert problem is None
    entry = conversations.get("c1", now=2)
    assert entry is not None
    assert (entry.user_id, entry.last_response_id) == ("u", "r2")


def test_a_response_id_of_another_agents_turn_is_not_claimed() -> None:
    conversations = table()
    conversations.record("c1", agent_id="a", user_id="victim", response_id="r1", now=0)
    problem = conversations.record("c2", agent_id="b", user_id="mallory", response_id="r1", now=1)
    assert problem is not None and "turn held by another agent" in problem
    owner = conversations.turn("r1", now=2)
    assert owner is not None and owner.conversation_id == "c1"
    assert conversations.get("c2", now=2) is not None  # the new conversation itself is fine


def test_an_agent_that_repeats_its_own_ids_gets_no_turn_protection_for_them() -> None:
    """A script that answers a fixed response_id: the id names no turn any more."""
    conversations = table()
    conversations.record("c1", agent_id="a", user_id="u", response_id="fixed", now=0)
    assert conversations.record("c2", agent_id="a", user_id="v", response_id="fixed", now=1) is None
    assert conversations.turn("fixed", now=2) is None
    assert conversations._turns == {}
    assert all(entry.turns == [] for entry in conversations._entries.values())


def test_turns_are_indexed_and_bounded_and_go_with_their_conversation() -> None:
    conversations = table(ttl=100)
    for n in range(TURNS_KEPT + 5):
        conversations.record("c1", agent_id="a", user_id="u", response_id=f"r{n}", now=n)
    assert conversations.turn("r0", now=TURNS_KEPT + 5) is None  # the oldest are forgotten
    owner = conversations.turn(f"r{TURNS_KEPT + 4}", now=TURNS_KEPT + 5)
    assert owner is not None and owner.conversation_id == "c1"
    assert conversations.turn("r5", now=TURNS_KEPT + 5) is not None
    assert len(conversations._turns) == TURNS_KEPT
    assert conversations.turn("r5", now=1000) is None  # expired with the conversation
    assert conversations._turns == {}


class ConversationsModel(RuleBasedStateMachine):
    """The table against a dict model: same entries, same counts, never over max."""

    @initialize(ttl=st.integers(1, 20), limit=st.integers(1, 5))
    def setup(self, ttl: int, limit: int) -> None:
        self.table = Conversations(ttl=ttl, limit=limit)
        self.ttl, self.limit = ttl, limit
        self.model: dict[str, tuple[str, float]] = {}  # id -> (agent, last used), in LRU order
        self.now = 0.0
        self.turn = 0

    def _expire(self) -> None:
        for cid, (_, used) in list(self.model.items()):
            if self.now - used > self.ttl:
                del self.model[cid]

    @rule(step=st.integers(0, 8))
    def tick(self, step: int) -> None:
        self.now += step

    @rule(cid=st.sampled_from("cdefgh"), agent=st.sampled_from("xyz"))
    def record(self, cid: str, agent: str) -> None:
        self.turn += 1
        self._expire()
        if cid in self.model and self.model[cid][0] != agent:
            problem = self.table.record(
                cid, agent_id=agent, user_id="u", response_id=f"r{self.turn}", now=self.now
            )
            assert problem is not None
            return
        self.table.record(
            cid, agent_id=agent, user_id="u", response_id=f"r{self.turn}", now=self.now
        )
        self.model.pop(cid, None)
        self.model[cid] = (agent, self.now)
        while len(self.model) > self.limit:
            del self.model[next(iter(self.model))]
        self._expire()

    @rule(cid=st.sampled_from("cdefgh"))
    def get(self, cid: str) -> None:
        entry = self.table.get(cid, self.now)
        self._expire()
        if cid in self.model:
            agent, _ = self.model.pop(cid)
            self.model[cid] = (agent, self.now)
            assert entry is not None and entry.agent_id == agent
        else:
            assert entry is None

    @invariant()
    def agrees(self) -> None:
        if not hasattr(self, "table"):
            return
        assert len(self.table) == len(self.model) <= self.limit
        for agent in "xyz":
            expected = sum(1 for a, _ in self.model.values() if a == agent)
            assert self.table.count_for(agent) == expected
        # Every indexed turn belongs to a live conversation, and only to it.
        live = {id(entry) for entry in self.table._entries.values()}
        assert all(id(owner) in live for owner in self.table._turns.values())
        assert len(self.table._turns) == sum(len(e.turns) for e in self.table._entries.values())


ConversationsModel.TestCase.settings = settings(max_examples=150, deadline=None)
test_conversations_model = ConversationsModel.TestCase
