// A prefill scheduler and a decode scheduler on separate pools, joined by an in-process link that
// copies segments (the fake of common/transfer for this layer): same tokens as a mixed scheduler,
// aborts reach the other side, a corrupted byte is caught, a lost room's pages stay out of the pool while
// the link says prefill may still write them, and every page comes back on both sides.
#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>
#include <set>

#include <gtest/gtest.h>

#include "common/engine/disaggregation.h"
#include "common/engine/scheduler.h"
#include "common/kernels/kernels.h"
#include "tests/unit/engine/tiny_model.h"

namespace tandem::engine {
namespace {

using testing::Tiny;
using testing::TinyDir;

std::unique_ptr<cache::StatePools> MakePools() {
  const auto& config = Tiny()->config;
  auto layout = StageLayoutFor(config, 0, static_cast<int>(config.num_hidden_layers), true);
  auto pools = cache::StatePools::Create(CacheShapesFor(config, 256), *layout,
                                         {.token_pages = 24, .window_pages = 8, .c4_state_slots = 8, .c128_state_slots = 8});
  EXPECT_TRUE(pools.ok()) << pools.status();
  return std::move(*pools);
}

// Both links over one room table; Ship copies bytes from the prefill pools into the decode pools.
class LocalLinks final : public PrefillLink, public DecodeLink {
 public:
  LocalLinks(cache::StatePools* prefill_pools, cache::StatePools* decode_pools)
      : prefill_pools_(prefill_pools), decode_pools_(decode_pools) {}

  struct Room {
    bool expected = false;
    std::optional<StateManifest> destination;
    std::optional<Handoff> handoff;
    std::optional<absl::Status> ack;
    std::optional<absl::Status> aborted_by_decode, aborted_by_prefill;
    std::optional<absl::Status> lost;  // decode's view: the connection to prefill dropped mid-transfer
    bool writes_may_land = false;      // PagesReusable answers no (the agent's late-write grace is running)
    int ships = 0;
    const StateManifest* source = nullptr;
  };
  std::map<uint64_t, Room> rooms;
  bool corrupt_next_ship = false;
  // As the UCX links do: prefill's link checksums what it shipped, decode's verifies what landed, and the
  // schedulers leave both to them.
  bool link_checksums = false;
  uint64_t checksum_from_scheduler = 1;
  bool checksums_shipped_state() const override { return link_checksums; }

  // PrefillLink
  absl::Status Expect(uint64_t room) override {
    if (rooms[room].expected) return absl::AlreadyExistsError("room is live");
    rooms[room].expected = true;
    return absl::OkStatus();
  }
  std::optional<absl::Status> DestinationReady(uint64_t room) override {
    Room& r = rooms[room];
    if (r.aborted_by_decode) return *r.aborted_by_decode;
    if (!r.destination) return std::nullopt;
    return absl::OkStatus();
  }
  absl::Status Ship(uint64_t room, const StateManifest& source, std::span<const size_t> segments) override {
    Room& r = rooms[room];
    ++r.ships;
    r.source = &source;
    for (size_t i : segments) {
      const auto& a = source.segments()[i];
      const auto& b = r.destination->segments()[i];
      EXPECT_EQ(a.length, b.length);
      std::memcpy(decode_pools_->region(b.pool).data() + b.offset, prefill_pools_->region(a.pool).data() + a.offset,
                  static_cast<size_t>(a.length));
    }
    if (corrupt_next_ship && !segments.empty()) {
      corrupt_next_ship = false;
      const auto& b = r.destination->segments()[segments.front()];
      decode_pools_->region(b.pool)[static_cast<size_t>(b.offset)] ^= 0x40;
    }
    return absl::OkStatus();
  }
  absl::Status Complete(uint64_t room, const Handoff& handoff) override {
    Room& r = rooms[room];
    r.handoff = handoff;
    if (link_checksums) {
      checksum_from_scheduler = handoff.checksum;
      auto checksum = r.source->Checksum(*prefill_pools_);
      if (!checksum.ok()) return checksum.status();
      r.handoff->checksum = *checksum;
    }
    return absl::OkStatus();
  }
  std::optional<absl::Status> Acknowledged(uint64_t room) override {
    Room& r = rooms[room];
    if (r.aborted_by_decode) return *r.aborted_by_decode;
    return r.ack;
  }
  void Abort(uint64_t room, const absl::Status& reason) override {
    // Called by whichever side's scheduler owns the request; both link roles share this object, so
    // the side is told apart by who has seen the room.
    Room& r = rooms[room];
    if (aborting_from_decode_) {
      r.aborted_by_decode = absl::AbortedError(absl::StrCat("decode aborted: ", reason.message()));
    } else {
      r.aborted_by_prefill = absl::AbortedError(absl::StrCat("prefill aborted: ", reason.message()));
    }
  }

  // DecodeLink
  absl::Status Register(const RoomInfo& room, const StateManifest& destination) override {
    rooms[room.room].destination = destination;
    return absl::OkStatus();
  }
  std::optional<absl::StatusOr<Handoff>> Poll(uint64_t room) override {
    Room& r = rooms[room];
    if (r.lost) return absl::StatusOr<Handoff>(*r.lost);
    if (r.aborted_by_prefill) return absl::StatusOr<Handoff>(*r.aborted_by_prefill);
    if (!r.handoff) return std::nullopt;
    if (link_checksums) {
      auto checksum = r.destination->Checksum(*decode_pools_);
      if (!checksum.ok()) return absl::StatusOr<Handoff>(checksum.status());
      if (*checksum != r.handoff->checksum) {
        r.aborted_by_decode = absl::DataLossError("link: checksum mismatch");  // as decode's agent tells prefill
        return absl::StatusOr<Handoff>(*r.aborted_by_decode);
      }
      Handoff verified = *r.handoff;
      verified.verified = true;
      return absl::StatusOr<Handoff>(verified);
    }
    return absl::StatusOr<Handoff>(*r.handoff);
  }
  void Acknowledge(uint64_t room, const absl::Status& status) override { rooms[room].ack = status; }
  bool PagesReusable(uint64_t room) override { return !rooms[room].writes_may_land; }

  bool aborting_from_decode_ = false;

 private:
  cache::StatePools* prefill_pools_;
  cache::StatePools* decode_pools_;
};

// Routes DecodeLink::Abort to the shared object with the side marked.
class DecodeSide final : public DecodeLink {
 public:
  explicit DecodeSide(LocalLinks* links) : links_(links) {}
  absl::Status Register(const RoomInfo& room, const StateManifest& destination) override {
    return links_->Register(room, destination);
  }
  std::optional<absl::StatusOr<Handoff>> Poll(uint64_t room) override { return links_->Poll(room); }
  void Acknowledge(uint64_t room, const absl::Status& status) override { links_->Acknowledge(room, status); }
  void Abort(uint64_t room, const absl::Status& reason) override {
    links_->aborting_from_decode_ = true;
    links_->Abort(room, reason);
    links_->aborting_from_decode_ = false;
  }
  bool PagesReusable(uint64_t room) override { return links_->PagesReusable(room); }

 private:
  LocalLinks* links_;
};

struct Seen {
  std::vector<int32_t> tokens;
  bool finished = false;
  absl::Status status;
  FinishReason reason = FinishReason::kNone;
};

class PdSchedulerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NE(Tiny(), nullptr);
    kernels::SetDeterministic(true);
    kernels::SetThreads(1);
    model_ = std::make_unique<model::Dsv4Model>(Tiny());
    prefill_pools_ = MakePools();
    decode_pools_ = MakePools();
    mixed_pools_ = MakePools();
    links_ = std::make_unique<LocalLinks>(prefill_pools_.get(), decode_pools_.get());
    decode_side_ = std::make_unique<DecodeSide>(links_.get());
    SchedulerOptions options{.chunked_prefill_size = 256, .max_running_requests = 8, .enable_prefix_cache = false};
    prefill_ = std::make_unique<Scheduler>(model_.get(), prefill_pools_.get(), options);
    prefill_->SetRole(EngineRole::kPrefill, links_.get(), nullptr);
    decode_ = std::make_unique<Scheduler>(model_.get(), decode_pools_.get(), options);
    decode_->SetRole(EngineRole::kDecode, nullptr, decode_side_.get());
    mixed_ = std::make_unique<Scheduler>(model_.get(), mixed_pools_.get(), options);
    for (auto* pools : {prefill_pools_.get(), decode_pools_.get()}) {
      for (const auto& u : pools->Usage()) initial_free_[pools][u.name] = u.free;
    }
  }
  void TearDown() override { kernels::SetDeterministic(false); }

  NewRequest Request(const std::string& id, EngineRole role, uint64_t room, std::vector<int32_t> prompt, int64_t max_new) {
    NewRequest r;
    r.id = id;
    r.role = role;
    r.room = {room, role == EngineRole::kDecode ? "127.0.0.1" : "", role == EngineRole::kDecode ? 8998 : 0};
    r.prompt = std::move(prompt);
    r.sampling.temperature = 0.7;  // sampled, seeded: the first-token draw must line up across engines
    r.sampling.seed = 1234;
    r.sampling.max_new_tokens = max_new;
    r.sampling.ignore_eos = true;
    const std::string key = std::string(EngineRoleName(role)) + ":" + id;
    r.sink = [this, key](RequestUpdate&& u) {
      Seen& s = seen_[key];
      for (const auto& t : u.tokens) s.tokens.push_back(t.token);
      if (u.finished) {
        s.finished = true;
        s.status = u.status;
        s.reason = u.finish_reason;
      }
    };
    return r;
  }

  void RunAll() {
    for (int i = 0; i < 100000 && !(prefill_->idle() && decode_->idle() && mixed_->idle()); ++i) {
      ASSERT_TRUE(prefill_->Step().ok());
      ASSERT_TRUE(decode_->Step().ok());
      ASSERT_TRUE(mixed_->Step().ok());
    }
    ASSERT_TRUE(prefill_->idle() && decode_->idle() && mixed_->idle());
  }

  void ExpectAllPagesBack() {
    for (auto* pools : {prefill_pools_.get(), decode_pools_.get()}) {
      for (const auto& u : pools->Usage()) EXPECT_EQ(u.free, initial_free_[pools][u.name]) << u.name;
      EXPECT_TRUE(pools->CheckAccounting().ok());
    }
  }

  // The token pages decode reserved for `room`, as the (pool, offset) of their segments.
  std::set<std::pair<cache::PoolKind, int64_t>> TokenPagesOf(uint64_t room) {
    std::set<std::pair<cache::PoolKind, int64_t>> out;
    const auto& destination = links_->rooms[room].destination;
    if (!destination) return out;
    for (const auto& s : destination->segments()) {
      if (s.pool == cache::PoolKind::kC4Kv || s.pool == cache::PoolKind::kC4Indexer || s.pool == cache::PoolKind::kC128Kv) {
        out.insert({s.pool, s.offset});
      }
    }
    return out;
  }
  int64_t FreeTokenPages() const { return decode_pools_->token_pages().free(); }

  std::vector<int32_t> Prompt(int64_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (auto& id : ids) id = static_cast<int32_t>(2 + rng() % 129000);
    return ids;
  }

  std::unique_ptr<model::Dsv4Model> model_;
  std::unique_ptr<cache::StatePools> prefill_pools_, decode_pools_, mixed_pools_;
  std::unique_ptr<LocalLinks> links_;
  std::unique_ptr<DecodeSide> decode_side_;
  std::unique_ptr<Scheduler> prefill_, decode_, mixed_;
  std::map<cache::StatePools*, std::map<std::string, int64_t>> initial_free_;
  std::map<std::string, Seen> seen_;
};

TEST_F(PdSchedulerTest, DisaggregatedTokensEqualTheMixedEngine) {
  const std::vector<int64_t> lengths = {1, 127, 128, 300, 513, 700};
  for (size_t i = 0; i < lengths.size(); ++i) {
    const auto prompt = Prompt(lengths[i], static_cast<uint32_t>(i));
    const std::string id = "r" + std::to_string(i);
    const uint64_t room = 0x8000000000000000ull + i;  // rooms use all 64 bits
    ASSERT_TRUE(prefill_->Add(Request(id, EngineRole::kPrefill, room, prompt, 12)).ok());
    ASSERT_TRUE(decode_->Add(Request(id, EngineRole::kDecode, room, prompt, 12)).ok());
    ASSERT_TRUE(mixed_->Add(Request(id, EngineRole::kMixed, 0, prompt, 12)).ok());
  }
  RunAll();
  for (size_t i = 0; i < lengths.size(); ++i) {
    const std::string id = "r" + std::to_string(i);
    const Seen& p = seen_["prefill:" + id];
    const Seen& d = seen_["decode:" + id];
    const Seen& m = seen_["mixed:" + id];
    ASSERT_TRUE(p.finished && d.finished && m.finished) << id;
    EXPECT_TRUE(p.status.ok() && d.status.ok()) << p.status << d.status;
    EXPECT_EQ(p.reason, FinishReason::kTransferred);
    ASSERT_EQ(p.tokens.size(), 1u);
    EXPECT_EQ(p.tokens[0], m.tokens[0]) << id;
    EXPECT_EQ(d.tokens, m.tokens) << id << " (prompt " << lengths[i] << ")";
  }
  // Prompts over a page were shipped in more than one piece.
  EXPECT_GT(links_->rooms[0x8000000000000000ull + 5].ships, 1);
  ExpectAllPagesBack();
}

TEST_F(PdSchedulerTest, CorruptedTransferFailsThatRequestOnly) {
  links_->corrupt_next_ship = true;
  const auto bad = Prompt(200, 7), good = Prompt(90, 8);
  ASSERT_TRUE(prefill_->Add(Request("bad", EngineRole::kPrefill, 11, bad, 5)).ok());
  ASSERT_TRUE(decode_->Add(Request("bad", EngineRole::kDecode, 11, bad, 5)).ok());
  RunAll();
  ASSERT_TRUE(prefill_->Add(Request("good", EngineRole::kPrefill, 12, good, 5)).ok());
  ASSERT_TRUE(decode_->Add(Request("good", EngineRole::kDecode, 12, good, 5)).ok());
  RunAll();
  EXPECT_EQ(seen_["decode:bad"].status.code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(seen_["decode:bad"].status.message().find("checksum mismatch"), std::string::npos);
  EXPECT_EQ(seen_["prefill:bad"].status.code(), absl::StatusCode::kDataLoss);
  EXPECT_TRUE(seen_["decode:good"].status.ok());
  EXPECT_EQ(seen_["decode:good"].tokens.size(), 5u);
  ExpectAllPagesBack();
}

TEST_F(PdSchedulerTest, LinksThatChecksumThemselvesAreLeftToIt) {
  links_->link_checksums = true;
  const auto prompt = Prompt(300, 3), bad = Prompt(200, 4);
  ASSERT_TRUE(prefill_->Add(Request("r", EngineRole::kPrefill, 41, prompt, 6)).ok());
  ASSERT_TRUE(decode_->Add(Request("r", EngineRole::kDecode, 41, prompt, 6)).ok());
  ASSERT_TRUE(mixed_->Add(Request("r", EngineRole::kMixed, 0, prompt, 6)).ok());
  RunAll();
  EXPECT_EQ(links_->checksum_from_scheduler, 0u);  // the prefill scheduler made no pass of its own
  ASSERT_TRUE(seen_["decode:r"].status.ok()) << seen_["decode:r"].status;
  EXPECT_EQ(seen_["decode:r"].tokens, seen_["mixed:r"].tokens);
  // A corruption is then the link's to catch, and it still fails that request only.
  links_->corrupt_next_ship = true;
  ASSERT_TRUE(prefill_->Add(Request("bad", EngineRole::kPrefill, 42, bad, 5)).ok());
  ASSERT_TRUE(decode_->Add(Request("bad", EngineRole::kDecode, 42, bad, 5)).ok());
  RunAll();
  EXPECT_EQ(seen_["decode:bad"].status.code(), absl::StatusCode::kDataLoss);
  ExpectAllPagesBack();
}

TEST_F(PdSchedulerTest, AbortOnEitherLegReachesTheOther) {
  const auto a = Prompt(600, 9), b = Prompt(600, 10);
  ASSERT_TRUE(prefill_->Add(Request("a", EngineRole::kPrefill, 21, a, 5)).ok());
  ASSERT_TRUE(decode_->Add(Request("a", EngineRole::kDecode, 21, a, 5)).ok());
  ASSERT_TRUE(prefill_->Add(Request("b", EngineRole::kPrefill, 22, b, 5)).ok());
  ASSERT_TRUE(decode_->Add(Request("b", EngineRole::kDecode, 22, b, 5)).ok());
  ASSERT_TRUE(prefill_->Step().ok());  // mid-prompt on prefill; decode holds pages for both
  ASSERT_TRUE(decode_->Step().ok());
  EXPECT_TRUE(decode_->Abort("a", absl::CancelledError("client went away")));
  EXPECT_TRUE(prefill_->Abort("b", absl::AbortedError("prefill shutting down")));
  RunAll();
  EXPECT_EQ(seen_["prefill:a"].status.code(), absl::StatusCode::kAborted);
  EXPECT_NE(seen_["prefill:a"].status.message().find("client went away"), std::string::npos);
  EXPECT_EQ(seen_["decode:b"].status.code(), absl::StatusCode::kAborted);
  EXPECT_NE(seen_["decode:b"].status.message().find("prefill shutting down"), std::string::npos);
  ExpectAllPagesBack();
}

TEST_F(PdSchedulerTest, ALostRoomFailsAtOnceAndItsPagesWaitUntilTheLinkSaysNoWriteCanLand) {
  const int64_t all = FreeTokenPages();
  ASSERT_TRUE(decode_->Add(Request("lost", EngineRole::kDecode, 61, Prompt(600, 21), 5)).ok());
  ASSERT_TRUE(decode_->Step().ok());
  const auto lost_pages = TokenPagesOf(61);
  ASSERT_FALSE(lost_pages.empty());
  const int64_t held = all - FreeTokenPages();
  ASSERT_GT(held, 0);
  // The connection to prefill drops with a copy of its in flight: the request fails now, its pages stay out.
  links_->rooms[61].lost = absl::UnavailableError("room 61: connection to prefill lost");
  links_->rooms[61].writes_may_land = true;
  ASSERT_TRUE(decode_->Step().ok());
  ASSERT_TRUE(seen_["decode:lost"].finished);
  EXPECT_EQ(seen_["decode:lost"].status.code(), absl::StatusCode::kUnavailable) << seen_["decode:lost"].status;
  EXPECT_EQ(decode_->Stats().quarantined_pages, held);
  EXPECT_EQ(FreeTokenPages(), all - held);
  // A new reservation meanwhile gets other pages; its clean end gives them back at once.
  ASSERT_TRUE(decode_->Add(Request("small", EngineRole::kDecode, 62, Prompt(100, 22), 5)).ok());
  ASSERT_TRUE(decode_->Step().ok());
  const auto small_pages = TokenPagesOf(62);
  ASSERT_FALSE(small_pages.empty());
  for (const auto& page : small_pages) EXPECT_FALSE(lost_pages.contains(page)) << "a quarantined page was handed out";
  EXPECT_TRUE(decode_->Abort("small", absl::CancelledError("client went away")));
  EXPECT_EQ(FreeTokenPages(), all - held);
  EXPECT_EQ(decode_->Stats().quarantined_pages, held);
  // A request that needs every page waits for them (it is not failed as too big for the engine).
  const int64_t page = decode_pools_->page_size();
  ASSERT_TRUE(decode_->Add(Request("big", EngineRole::kDecode, 63, Prompt(all * page - 5, 23), 5)).ok());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(decode_->Step().ok());
  EXPECT_FALSE(seen_["decode:big"].finished) << seen_["decode:big"].status;
  EXPECT_FALSE(links_->rooms[63].destination.has_value());
  EXPECT_TRUE(decode_->waiting_on_peer());  // the engine polls instead of spinning
  // The grace is over: the pages come back on the next step, before admission, which hands them out again.
  links_->rooms[61].writes_may_land = false;
  ASSERT_TRUE(decode_->Step().ok());
  EXPECT_EQ(decode_->Stats().quarantined_pages, 0);
  ASSERT_TRUE(links_->rooms[63].destination.has_value());
  const auto big_pages = TokenPagesOf(63);
  EXPECT_TRUE(std::all_of(lost_pages.begin(), lost_pages.end(), [&](const auto& p) { return big_pages.contains(p); }));
  EXPECT_TRUE(decode_->Abort("big", absl::CancelledError("client went away")));
  ExpectAllPagesBack();
}

TEST_F(PdSchedulerTest, AnAbortedTransferKeepsItsPagesUntilThePeerStopped) {
  const int64_t all = FreeTokenPages();
  ASSERT_TRUE(decode_->Add(Request("a", EngineRole::kDecode, 71, Prompt(300, 31), 5)).ok());
  ASSERT_TRUE(decode_->Step().ok());
  // Prefill has not acknowledged the abort yet: the link still says its writes may land.
  links_->rooms[71].writes_may_land = true;
  EXPECT_TRUE(decode_->Abort("a", absl::CancelledError("client went away")));
  ASSERT_TRUE(seen_["decode:a"].finished);
  EXPECT_EQ(seen_["decode:a"].status.code(), absl::StatusCode::kCancelled);
  EXPECT_TRUE(links_->rooms[71].aborted_by_decode.has_value());
  EXPECT_GT(decode_->Stats().quarantined_pages, 0);
  EXPECT_LT(FreeTokenPages(), all);
  EXPECT_TRUE(decode_->idle());
  ASSERT_TRUE(decode_->Step().ok());  // still writable: nothing comes back
  EXPECT_LT(FreeTokenPages(), all);
  links_->rooms[71].writes_may_land = false;
  ASSERT_TRUE(decode_->Step().ok());  // an idle engine's step still gives them back
  EXPECT_EQ(decode_->Stats().quarantined_pages, 0);
  ExpectAllPagesBack();
}

TEST_F(PdSchedulerTest, RoomsAreRequiredAndUnique) {
  auto no_room = Request("x", EngineRole::kPrefill, 0, {5, 6}, 2);
  EXPECT_EQ(prefill_->Add(std::move(no_room)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(prefill_->Add(Request("y", EngineRole::kMixed, 0, {5, 6}, 2)).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(prefill_->Add(Request("z", EngineRole::kPrefill, 31, {5, 6}, 2)).ok());
  EXPECT_EQ(prefill_->Add(Request("z2", EngineRole::kPrefill, 31, {5, 6}, 2)).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(prefill_->Abort("z", absl::CancelledError("done")));
}

}  // namespace
}  // namespace tandem::engine
