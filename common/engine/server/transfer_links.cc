#include "common/engine/server/transfer_links.h"

#include <cstdlib>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <thread>

#include <spdlog/spdlog.h>

#include "common/engine/pd_trace.h"
#include "common/engine/server/room_outcomes.h"
#include "common/transfer/checksum.h"
#include "common/transfer/decode_agent.h"
#include "common/transfer/handshake.h"
#include "common/transfer/prefill_agent.h"
#include "common/transfer/ucx_transport.h"

namespace tandem::engine {
namespace {

using std::chrono::milliseconds;

// The pools' regions, registered once; segments name them by PoolKind.
class RegisteredPools {
 public:
  absl::Status Register(transfer::KvTransport& transport, cache::StatePools& pools) {
    for (cache::PoolKind kind : cache::kAllPools) {
      auto region = pools.region(kind);
      if (region.empty()) continue;
      TANDEM_ASSIGN_OR_RETURN(const uint32_t id, transport.RegisterRegion({cache::PoolName(kind), region.data(), region.size()}));
      ids_[static_cast<size_t>(kind)] = id;
    }
    return absl::OkStatus();
  }
  transfer::Segment Convert(const StateSegment& s) const {
    return {ids_[static_cast<size_t>(s.pool)], static_cast<uint64_t>(s.offset), static_cast<uint64_t>(s.length)};
  }
  std::vector<transfer::Segment> Convert(const StateManifest& manifest) const {
    std::vector<transfer::Segment> out;
    out.reserve(manifest.segments().size());
    for (const auto& s : manifest.segments()) out.push_back(Convert(s));
    return out;
  }

 private:
  std::array<uint32_t, cache::kAllPools.size()> ids_{};
};

// Live pools the transport cannot ship from (device memory) and their registered host copy: the same
// shapes, so a segment has the same offset in both; segments are copied across on the way out and in, by the
// engine's copier (asynchronous; a fence says when they landed).
struct Staging {
  cache::StatePools* live = nullptr;  // null: the registered pools are the live ones
  cache::StatePools* host = nullptr;
  StagingCopier* copier = nullptr;
  absl::Status ToHost(const StateSegment& s) const {
    return copier->Enqueue(host->region(s.pool).data() + s.offset, live->region(s.pool).data() + s.offset,
                           static_cast<size_t>(s.length));
  }
  absl::Status ToLive(const StateSegment& s) const {
    return copier->Enqueue(live->region(s.pool).data() + s.offset, host->region(s.pool).data() + s.offset,
                           static_cast<size_t>(s.length));
  }
};

std::string LayoutHash(const cache::StatePools& pools, const TransferLinkOptions& options) {
  std::string text = absl::StrCat(options.model_config_hash, "|", options.dtype, "|", pools.page_size());
  for (cache::PoolKind kind : cache::kAllPools) {
    absl::StrAppend(&text, "|", cache::PoolName(kind), ":", pools.layers(kind), "x", pools.layer_page_bytes(kind));
  }
  return fmt::format("{:016x}", transfer::ChecksumBytes(reinterpret_cast<const uint8_t*>(text.data()), text.size()));
}

// The `path` label of the transfer metrics: device IPC, staged through host copies, or host pools shipped as they are.
std::string_view TransferPath(bool device_ipc, bool staged) { return device_ipc ? "ipc" : staged ? "staged" : "host"; }

// Registered region i of `shipped` (the transport's host copy) and the live (device) pools' region of the
// same pool: the same shapes, so a segment's offset holds in both.
struct RegionPair {
  uint8_t* host = nullptr;
  uint8_t* live = nullptr;
  size_t size = 0;
};
std::vector<RegionPair> PairRegions(cache::StatePools& shipped, cache::StatePools& live) {
  std::vector<RegionPair> out;
  for (cache::PoolKind kind : cache::kAllPools) {  // the order RegisteredPools registers them in
    auto region = shipped.region(kind);
    if (region.empty()) continue;
    out.push_back({region.data(), live.region(kind).data(), region.size()});
  }
  return out;
}

// A decode's device pools mapped into prefill: its rooms' segments are copied from this engine's live device
// pools straight into them, on the device IPC stream, and waited for (so COMPLETE follows the bytes).
class IpcDevicePeer final : public transfer::DevicePeer {
 public:
  IpcDevicePeer(DeviceIpc* ipc, std::unique_ptr<DeviceMapping> mapping, std::vector<RegionPair> local)
      : ipc_(ipc), mapping_(std::move(mapping)), local_(std::move(local)) {}
  absl::Status Copy(std::span<const transfer::Segment> src, std::span<const transfer::Segment> dst) override {
    std::lock_guard lock(mutex_);  // one fence covers exactly this call's copies
    absl::Status status = absl::OkStatus();
    for (size_t i = 0; i < src.size() && status.ok(); ++i) {
      if (src[i].region >= local_.size()) {
        status = absl::InvalidArgumentError("device IPC copy from an unknown region");
      } else {
        status = ipc_->copier().Enqueue(mapping_->base(dst[i].region) + dst[i].offset,
                                        local_[src[i].region].live + src[i].offset, src[i].length);
      }
    }
    // Wait for whatever was queued even after an error: no copy may land in decode's pages once this
    // returns (decode frees them when the room ends).
    absl::StatusOr<StagingFence> fence = ipc_->copier().Fence();
    const absl::Status waited = fence.ok() ? (*fence)() : fence.status();
    return status.ok() ? waited : status;
  }
  absl::Status InvertByte(const transfer::Segment& dst) override {
    std::lock_guard lock(mutex_);
    return ipc_->InvertByte(mapping_->base(dst.region) + dst.offset);
  }

 private:
  DeviceIpc* ipc_;
  std::unique_ptr<DeviceMapping> mapping_;
  std::vector<RegionPair> local_;
  std::mutex mutex_;
};

// Prefill: how to map a same-host decode's device pools, when this engine's pools are on the GPU.
transfer::PrefillDeviceIpc PrefillIpc(transfer::PdTransfer mode, const StagedPools& staged, std::vector<RegionPair> pairs) {
  transfer::PrefillDeviceIpc out;
  out.mode = mode;
  if (!staged.live || !staged.ipc || mode == transfer::PdTransfer::kStaged) return out;
  out.open = [ipc = staged.ipc, pairs = std::move(pairs)](const transfer::DeviceExport& peer)
      -> absl::StatusOr<std::shared_ptr<transfer::DevicePeer>> {
    std::vector<std::string> handles;
    for (const auto& region : peer.regions) handles.push_back(region.handle);
    TANDEM_ASSIGN_OR_RETURN(std::unique_ptr<DeviceMapping> mapping, ipc->Open(handles));
    return std::shared_ptr<transfer::DevicePeer>(std::make_shared<IpcDevicePeer>(ipc, std::move(mapping), pairs));
  };
  return out;
}

// Decode: its device pools exported for a same-host prefill, and the checksum of what such a prefill wrote
// there: the segments read back into the host copy (the staging copier, DMA) and checksummed as the wire's.
absl::StatusOr<transfer::DecodeDeviceIpc> DecodeIpc(transfer::PdTransfer mode, const StagedPools& staged,
                                                    std::vector<RegionPair> pairs, std::shared_ptr<transfer::KvTransport> transport) {
  transfer::DecodeDeviceIpc out;
  out.mode = mode;
  if (!staged.live || !staged.ipc || mode == transfer::PdTransfer::kStaged) return out;
  transfer::DeviceExport local;
  local.host_id = transfer::LocalHostId();
  local.process_token = transfer::LocalProcessToken();
  local.location = staged.ipc->location();
  for (const RegionPair& pair : pairs) {
    absl::StatusOr<std::string> handle = staged.ipc->Export(pair.live);
    if (!handle.ok()) {
      if (mode == transfer::PdTransfer::kIpc) {
        return absl::FailedPreconditionError(absl::StrCat("--pd-transfer ipc: cannot export the device pools: ", handle.status().message()));
      }
      spdlog::warn("PD device IPC: cannot export the device pools: {}; prefill peers stage through host memory",
                   std::string(handle.status().message()));
      return out;
    }
    local.regions.push_back({pair.size, std::move(*handle)});
  }
  out.local = std::move(local);
  out.device_checksum = [pairs = std::move(pairs), copier = staged.copier,
                         transport = std::move(transport)](std::span<const transfer::Segment> segments) -> absl::StatusOr<uint64_t> {
    absl::Status status = absl::OkStatus();
    for (size_t i = 0; i < segments.size() && status.ok(); ++i) {
      const transfer::Segment& s = segments[i];
      if (s.region >= pairs.size()) {
        status = absl::InvalidArgumentError("device checksum of an unknown region");
      } else {
        status = copier->Enqueue(pairs[s.region].host + s.offset, pairs[s.region].live + s.offset, s.length);
      }
    }
    absl::StatusOr<StagingFence> fence = copier->Fence();  // what was queued lands before this returns
    const absl::Status waited = fence.ok() ? (*fence)() : fence.status();
    TANDEM_RETURN_IF_ERROR(status);
    TANDEM_RETURN_IF_ERROR(waited);
    return transfer::ChecksumSegments(transport->regions(), segments);
  };
  return out;
}

std::string EncodeChecksum(uint64_t value) {
  std::string out(8, '\0');
  std::memcpy(out.data(), &value, 8);
  return out;
}

// The prefill side. Ship only queues work and returns: on the scheduler thread it enqueues the chunk's
// staging copies (device pools: live -> host copy) and a fence, and hands the chunk's runs to this link's
// shipping thread, which waits on the fence and then puts the runs. So while the shipping thread puts chunk N,
// the scheduler computes chunk N+1 and enqueues its copies (DMA on the copier's stream): the copy of chunk
// N+1 overlaps the puts of chunk N (and the forward of chunk N+1 overlaps them too). The shipping thread waits
// on a chunk's fence only once the puts before it returned, and inside each put (remote completion).
// Complete checksums the room's bytes on the scheduler thread while the last chunk is put, and queues the
// COMPLETE behind those puts. A failure ends the room in the agent; the scheduler learns of it through
// Acknowledged (or its next Ship).
class UcxPrefillLink final : public PrefillLink {
 public:
  UcxPrefillLink(std::shared_ptr<transfer::KvTransport> transport, RegisteredPools pools, Staging staging,
                 std::function<void()> wake)
      : transport_(std::move(transport)), pools_(pools), staging_(staging), outcomes_(std::move(wake)) {
    // Test hook: one byte of the first put for this room lands inverted at decode (the source stays intact),
    // so tests can prove the checksums catch a corrupted transfer.
    if (const char* room = std::getenv("TANDEM_TEST_CORRUPT_ROOM")) corrupt_room_ = std::strtoull(room, nullptr, 10);
  }
  ~UcxPrefillLink() override {
    {
      std::lock_guard lock(jobs_mutex_);
      stop_ = true;  // what is still queued is dropped: the agent fails those rooms as it shuts down
    }
    jobs_changed_.notify_all();
    if (shipper_.joinable()) shipper_.join();
  }

  absl::Status Start(const transfer::Handshake& local, const TransferLinkOptions& options, TransferObserver observer,
                     transfer::PrefillDeviceIpc device_ipc) {
    TANDEM_ASSIGN_OR_RETURN(agent_, transfer::PrefillAgent::Create(transport_.get(), local, options.agent, options.bootstrap_host,
                                                                    static_cast<uint16_t>(options.bootstrap_port), std::move(device_ipc)));
    agent_->set_on_progress([this](transfer::RoomId room) {  // a destination arrived
      pd_trace::Mark(room, "destination_arrived");
      outcomes_.Wake();
    });
    if (observer) {
      agent_->set_on_room_transferred([observer, staged = staging_.live != nullptr](transfer::RoomId, uint64_t bytes,
                                                                                    std::chrono::nanoseconds latency, bool device_ipc) {
        observer(bytes, std::chrono::duration<double>(latency).count(), TransferPath(device_ipc, staged));
      });
    }
    shipper_ = std::thread([this] { ShipLoop(); });
    return absl::OkStatus();
  }
  int port() const { return agent_->port(); }
  transfer::AgentMetrics metrics() const { return agent_->metrics(); }

  absl::Status Expect(uint64_t room) override {
    outcomes_.Forget(room);
    return agent_->ExpectRoom(room, [done = outcomes_.Callback()](transfer::RoomId room, const absl::Status& status) {
      if (status.ok()) pd_trace::Mark(room, "acked");
      done(room, status);
    });
  }
  std::optional<absl::Status> DestinationReady(uint64_t room) override {
    if (auto done = outcomes_.Find(room)) return done->ok() ? absl::InternalError("room ended before its state was sent") : *done;
    auto destination = agent_->WaitDestination(room, milliseconds(0));
    if (destination.ok()) return absl::OkStatus();
    if (destination.status().code() == absl::StatusCode::kDeadlineExceeded) {
      // Still live when the agent looked; if it ended since, its outcome is the answer, not the timeout.
      auto done = outcomes_.Find(room);
      if (!done) return std::nullopt;
      return done->ok() ? absl::InternalError("room ended before its state was sent") : *done;
    }
    return destination.status();
  }
  absl::Status Ship(uint64_t room, const StateManifest& source, std::span<const size_t> segments) override {
    // An earlier chunk's put failed (the room ended): stop here.
    if (auto done = outcomes_.Find(room)) return done->ok() ? absl::InternalError("room ended before its state was sent") : *done;
    sources_[room] = &source;  // the scheduler keeps it alive until the room ends
    pd_trace::Mark(room, "shipped");
    // The agent takes runs of consecutive destination indices.
    Job job;
    job.room = room;
    size_t i = 0;
    while (i < segments.size()) {
      Run run{segments[i], {}};
      while (i < segments.size() && segments[i] == run.first + run.segments.size()) {
        const StateSegment& segment = source.segments()[segments[i++]];
        if (staging_.live) TANDEM_RETURN_IF_ERROR(staging_.ToHost(segment));
        run.segments.push_back(pools_.Convert(segment));
      }
      job.runs.push_back(std::move(run));
    }
    if (job.runs.empty()) return absl::OkStatus();
    if (staging_.live) {
      TANDEM_ASSIGN_OR_RETURN(job.fence, staging_.copier->Fence());
    }
    Queue(std::move(job));
    return absl::OkStatus();
  }
  // One checksum of the shipped bytes serves as the wire checksum (decode's agent checks it over what landed)
  // and as the engine's: no pass over the live pools, none over device memory.
  bool checksums_shipped_state() const override { return true; }
  absl::Status Complete(uint64_t room, const Handoff& handoff) override {
    auto source = sources_.find(room);
    if (source == sources_.end()) return absl::InternalError("complete before any segment was shipped");
    const std::vector<transfer::Segment> shipped = pools_.Convert(*source->second);
    sources_.erase(source);
    // Taken here, on the scheduler thread, while the shipping thread puts the last chunk (both only read the
    // bytes), over what the transport ships from: staged, the host copy once this room's copies landed.
    if (staging_.live) {
      TANDEM_ASSIGN_OR_RETURN(const StagingFence fence, staging_.copier->Fence());
      TANDEM_RETURN_IF_ERROR(fence());
    }
    TANDEM_ASSIGN_OR_RETURN(const uint64_t checksum, transfer::ChecksumSegments(transport_->regions(), shipped));
    Job job;
    job.room = room;
    job.complete = transfer::Completion{handoff.first_token, checksum, EncodeChecksum(checksum)};
    Queue(std::move(job));
    return absl::OkStatus();
  }
  std::optional<absl::Status> Acknowledged(uint64_t room) override {
    auto done = outcomes_.Find(room);
    if (done) outcomes_.Forget(room);
    return done;
  }
  void Abort(uint64_t room, const absl::Status& reason) override {
    sources_.erase(room);
    {
      std::lock_guard lock(jobs_mutex_);
      std::erase_if(jobs_, [room](const Job& job) { return job.room == room; });
    }
    if (auto status = agent_->Abort(room, std::string(reason.message())); !status.ok() && !absl::IsNotFound(status)) {
      spdlog::warn("prefill: abort room {}: {}", room, std::string(status.message()));
    }
  }

 private:
  struct Run {
    size_t first = 0;  // destination index of segments[0]
    std::vector<transfer::Segment> segments;
  };
  // A chunk's runs (after its copies, when staged) or, for `complete`, the room's COMPLETE.
  struct Job {
    uint64_t room = 0;
    std::vector<Run> runs;
    StagingFence fence;
    std::optional<transfer::Completion> complete;
  };

  void Queue(Job job) {
    {
      std::lock_guard lock(jobs_mutex_);
      jobs_.push_back(std::move(job));
    }
    jobs_changed_.notify_one();
  }
  void ShipLoop() {
    for (;;) {
      Job job;
      {
        std::unique_lock lock(jobs_mutex_);
        jobs_changed_.wait(lock, [&] { return stop_ || !jobs_.empty(); });
        if (stop_) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      if (absl::Status status = RunJob(job); !status.ok()) {
        // A failed put has ended the room in the agent already; anything else (a staging copy) ends it here.
        // Either way RoomDone reports it and the scheduler's next poll fails the request.
        if (auto aborted = agent_->Abort(job.room, std::string(status.message())); !aborted.ok() && !absl::IsNotFound(aborted)) {
          spdlog::warn("prefill: abort room {}: {}", job.room, std::string(aborted.message()));
        }
      }
    }
  }
  absl::Status RunJob(const Job& job) {
    // Waits here (the shipping thread, never the scheduler) for this chunk's copies into the host copy.
    if (job.fence) TANDEM_RETURN_IF_ERROR(job.fence());
    for (const Run& run : job.runs) {
      if (job.room == corrupt_room_ && corrupt_room_ != 0) {
        corrupt_room_ = 0;
        spdlog::warn("test hook: corrupting the transfer of room {}", job.room);
        transport_->CorruptNextPuts(1);  // this thread is the only one putting
      }
      TANDEM_RETURN_IF_ERROR(agent_->Ship(job.room, run.first, run.segments));
    }
    if (!job.complete) {
      pd_trace::Mark(job.room, "puts_done");
      return absl::OkStatus();
    }
    pd_trace::Mark(job.room, "complete_sent");  // before: decode's ack may overtake this thread's next line
    return agent_->Complete(job.room, *job.complete);
  }

  std::shared_ptr<transfer::KvTransport> transport_;
  RegisteredPools pools_;
  Staging staging_;
  RoomOutcomes outcomes_;
  std::unique_ptr<transfer::PrefillAgent> agent_;
  std::map<uint64_t, const StateManifest*> sources_;  // scheduler thread only
  uint64_t corrupt_room_ = 0;                         // shipping thread only
  std::mutex jobs_mutex_;
  std::condition_variable jobs_changed_;
  std::deque<Job> jobs_;
  bool stop_ = false;
  std::thread shipper_;  // last: started once the agent exists, joined before anything goes
};

class UcxDecodeLink final : public DecodeLink {
 public:
  UcxDecodeLink(std::shared_ptr<transfer::KvTransport> transport, RegisteredPools pools, Staging staging,
                std::function<void()> wake)
      : transport_(std::move(transport)), pools_(pools), staging_(staging), outcomes_(std::move(wake)) {}

  absl::Status Start(const transfer::Handshake& local, const TransferLinkOptions& options, TransferObserver observer,
                     transfer::DecodeDeviceIpc device_ipc) {
    TANDEM_ASSIGN_OR_RETURN(agent_, transfer::DecodeAgent::Create(transport_.get(), local, options.agent, std::move(device_ipc)));
    agent_->set_on_progress([this](transfer::RoomId room) {  // a completion arrived
      pd_trace::Mark(room, "completion_arrived");
      outcomes_.Wake();
    });
    // Quarantined pages came free: the scheduler gives them back on its next step, even when idle.
    agent_->set_on_pages_reusable([this](transfer::RoomId) { outcomes_.Wake(); });
    if (observer) {
      agent_->set_on_room_transferred([observer, staged = staging_.live != nullptr](transfer::RoomId, uint64_t bytes,
                                                                                    std::chrono::nanoseconds latency, bool device_ipc) {
        observer(bytes, std::chrono::duration<double>(latency).count(), TransferPath(device_ipc, staged));
      });
    }
    return absl::OkStatus();
  }
  transfer::AgentMetrics metrics() const { return agent_->metrics(); }

  absl::Status Register(const RoomInfo& room, const StateManifest& destination) override {
    outcomes_.Forget(room.room);
    if (staging_.live) destinations_[room.room] = destination;
    TANDEM_RETURN_IF_ERROR(agent_->Register(room.room, room.bootstrap_host, static_cast<uint16_t>(room.bootstrap_port),
                                            pools_.Convert(destination), outcomes_.Callback()));
    pd_trace::Mark(room.room, "registered");
    return absl::OkStatus();
  }
  std::optional<absl::StatusOr<Handoff>> Poll(uint64_t room) override {
    if (auto done = outcomes_.Find(room); done && !done->ok()) {
      outcomes_.Forget(room);
      return absl::StatusOr<Handoff>(*done);
    }
    pd_trace::Mark(room, "polled");  // the last one is the look that found the completion
    auto completion = agent_->WaitCompletion(room, milliseconds(0));
    if (!completion.ok()) {
      absl::Status failed = completion.status();
      if (failed.code() == absl::StatusCode::kDeadlineExceeded) {
        // Still live when the agent looked; if it ended since, its outcome is the answer, not the timeout.
        auto done = outcomes_.Find(room);
        if (!done) return std::nullopt;
        failed = done->ok() ? absl::InternalError("room ended before its state arrived") : *done;
      }
      outcomes_.Forget(room);
      return absl::StatusOr<Handoff>(failed);
    }
    // Past here prefill has written everything: a failure ends the room in the agent (cleanly, so its pages
    // are reusable at once) instead of leaving it live until its lease.
    auto fail = [&](absl::Status status) {
      (void)agent_->Abort(room, std::string(status.message()));
      outcomes_.Forget(room);
      destinations_.erase(room);
      return absl::StatusOr<Handoff>(std::move(status));
    };
    Handoff handoff;
    handoff.first_token = completion->first_token;
    if (completion->payload.size() != 8) return fail(absl::DataLossError("prefill's completion carries no engine checksum"));
    std::memcpy(&handoff.checksum, completion->payload.data(), 8);
    // The agent checked prefill's checksum over the bytes that landed (WaitCompletion): the live pools
    // themselves, or the host copy that the batch below moves into them (a failed copy is an error, as for any
    // device copy), so the scheduler does not read them again.
    handoff.verified = true;
    pd_trace::Mark(room, "verified");
    if (staging_.live && completion->device_ipc) {
      destinations_.erase(room);  // prefill wrote the live (device) pools themselves; the agent checked them there
    } else if (staging_.live) {
      // The state landed in the host copy: move it into the live (device) pools before decode reads it. All
      // segments go as one batch of DMA copies, waited for here, on the scheduler thread: the next thing it
      // does is read these pages.
      auto destination = destinations_.find(room);
      if (destination == destinations_.end()) return fail(absl::InternalError("staged room completed without its destination"));
      absl::Status copied;
      for (const auto& segment : destination->second.segments()) {
        if (copied = staging_.ToLive(segment); !copied.ok()) break;
      }
      absl::StatusOr<StagingFence> fence = copied.ok() ? staging_.copier->Fence() : absl::StatusOr<StagingFence>(copied);
      if (fence.ok()) copied = (*fence)();
      if (!fence.ok()) copied = fence.status();
      destinations_.erase(destination);
      if (!copied.ok()) return fail(copied);
      pd_trace::Mark(room, "staged");
    }
    return absl::StatusOr<Handoff>(handoff);
  }
  void Acknowledge(uint64_t room, const absl::Status& status) override {
    absl::Status sent = status.ok() ? agent_->Ack(room) : agent_->Abort(room, std::string(status.message()));
    if (!sent.ok()) spdlog::warn("decode: acknowledge room {}: {}", room, std::string(sent.message()));
    outcomes_.Forget(room);
    destinations_.erase(room);
  }
  void Abort(uint64_t room, const absl::Status& reason) override {
    if (auto status = agent_->Abort(room, std::string(reason.message())); !status.ok() && !absl::IsNotFound(status)) {
      spdlog::warn("decode: abort room {}: {}", room, std::string(status.message()));
    }
    outcomes_.Forget(room);
    destinations_.erase(room);
  }
  // Over every path: device IPC copies land in the live pools, and so do RDMA puts into host pools; a staged
  // room's late put only reaches the host copy, but that copy is the next room's landing place too.
  bool PagesReusable(uint64_t room) override { return agent_->PagesReusable(room); }

 private:
  std::shared_ptr<transfer::KvTransport> transport_;
  RegisteredPools pools_;
  Staging staging_;
  RoomOutcomes outcomes_;
  std::unique_ptr<transfer::DecodeAgent> agent_;
  std::map<uint64_t, StateManifest> destinations_;  // staged rooms: where their bytes go in the live pools
};

// The transport exists first so the pools can be allocated by it; the links share it, and the engine keeps
// this setup (and so the pools' memory) until the pools are gone.
class UcxTransferSetup final : public TransferSetup {
 public:
  UcxTransferSetup(std::shared_ptr<transfer::KvTransport> transport, EngineRole role, TransferLinkOptions options,
                   TransferObserver observer, std::function<void(std::function<TransferStats()>)> on_stats, int* bound_bootstrap_port)
      : transport_(std::move(transport)),
        role_(role),
        options_(std::move(options)),
        observer_(std::move(observer)),
        on_stats_(std::move(on_stats)),
        bound_bootstrap_port_(bound_bootstrap_port) {}

  cache::RegionAllocator allocator() override {
    return [transport = transport_](std::string_view, int64_t bytes) { return transport->AllocateRegion(static_cast<size_t>(bytes)); };
  }

  absl::StatusOr<DisaggregationLinks> MakeLinks(cache::StatePools& pools, std::function<void()> wake,
                                                StagedPools staged) override {
    if (staged.live && !staged.copier) return absl::InvalidArgumentError("staged pools without a staging copier");
    const Staging staging{staged.live, &pools, staged.copier};
    RegisteredPools registered;
    TANDEM_RETURN_IF_ERROR(registered.Register(*transport_, pools));
    transfer::LayoutDescriptor descriptor;
    descriptor.model_config_hash = options_.model_config_hash;
    descriptor.page_size = static_cast<uint32_t>(pools.page_size());
    descriptor.dtype = options_.dtype;
    descriptor.layer_begin = static_cast<uint32_t>(pools.layout().stage().begin);
    descriptor.layer_end = static_cast<uint32_t>(pools.layout().stage().end);
    const transfer::Handshake local = transfer::LocalHandshake(descriptor, LayoutHash(pools, options_));
    // Device IPC works on the transport's region numbers: they must be the pools' regions, in order.
    std::vector<RegionPair> pairs;
    if (staged.live) {
      pairs = PairRegions(pools, *staged.live);
      const auto regions = transport_->regions();
      bool same = regions.size() == pairs.size();
      for (size_t i = 0; same && i < pairs.size(); ++i) same = regions[i].base == pairs[i].host;
      if (!same) return absl::InternalError("device IPC: the transport's regions are not the pools' regions");
    }

    DisaggregationLinks links;
    if (role_ == EngineRole::kPrefill) {
      auto link = std::make_unique<UcxPrefillLink>(transport_, registered, staging, std::move(wake));
      TANDEM_RETURN_IF_ERROR(link->Start(local, options_, observer_, PrefillIpc(options_.pd_transfer, staged, std::move(pairs))));
      if (bound_bootstrap_port_) *bound_bootstrap_port_ = link->port();
      UcxPrefillLink* raw = link.get();
      if (on_stats_) on_stats_([raw] { return TransferStats{raw->metrics()}; });
      links.prefill = std::move(link);
    } else if (role_ == EngineRole::kDecode) {
      auto link = std::make_unique<UcxDecodeLink>(transport_, registered, staging, std::move(wake));
      TANDEM_ASSIGN_OR_RETURN(transfer::DecodeDeviceIpc device_ipc,
                              DecodeIpc(options_.pd_transfer, staged, std::move(pairs), transport_));
      TANDEM_RETURN_IF_ERROR(link->Start(local, options_, observer_, std::move(device_ipc)));
      UcxDecodeLink* raw = link.get();
      if (on_stats_) on_stats_([raw] { return TransferStats{raw->metrics()}; });
      links.decode = std::move(link);
    }
    return links;
  }

 private:
  std::shared_ptr<transfer::KvTransport> transport_;
  EngineRole role_;
  TransferLinkOptions options_;
  TransferObserver observer_;
  std::function<void(std::function<TransferStats()>)> on_stats_;
  int* bound_bootstrap_port_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<TransferSetup>> MakeTransferSetup(EngineRole role, const TransferLinkOptions& options,
                                                                 TransferObserver observer,
                                                                 std::function<void(std::function<TransferStats()>)> on_stats,
                                                                 int* bound_bootstrap_port) {
  if (role != EngineRole::kPrefill && role != EngineRole::kDecode) {
    return absl::InvalidArgumentError("transfer links exist only for the prefill and decode roles");
  }
  TANDEM_ASSIGN_OR_RETURN(auto ucx, transfer::UcxTransport::Create());
  std::shared_ptr<transfer::KvTransport> transport = std::move(ucx);
  return std::make_unique<UcxTransferSetup>(std::move(transport), role, options, std::move(observer), std::move(on_stats),
                                            bound_bootstrap_port);
}

}  // namespace tandem::engine
