// CUDA graphs of the GPU forward's device work: one captured graph per *signature*, the list of every
// host-side value that shapes a step's launches (device_model.cc builds it: token and chunk counts, run and
// emit counts, bucketed sizes, the table layout, the memory epoch). A step whose signature has a graph
// replays it; one seen before is captured (so one-off shapes never pay an instantiation); others launch
// op by op. Bounded LRU: evicted graphs are destroyed.
#pragma once

#include <cstdint>
#include <functional>
#include <list>
#include <map>
#include <vector>

#include <cuda_runtime_api.h>

#include "common/core/status.h"

namespace tandem::model::cuda {

struct GraphStats {
  int64_t captures = 0;          // graphs captured (the capturing step launched its new graph)
  int64_t replays = 0;           // steps that launched a graph captured by an earlier step
  int64_t eager = 0;             // steps launched op by op (not eligible, a first sighting, a failed capture)
  int64_t capture_failures = 0;  // captures refused by CUDA (that signature then stays eager)
  int64_t evictions = 0;         // graphs destroyed to stay within the bound
  int64_t invalidations = 0;     // times every graph was dropped (the memory they point at moved)
  int64_t cached = 0;            // graphs held now
};

class GraphCache {
 public:
  struct Options {
    int max_graphs = 32;     // instantiated graphs kept (LRU)
    int capture_after = 2;   // capture at this sighting of a signature (earlier ones run eagerly)
    int max_signatures = 128;  // signatures remembered, captured or not (LRU)
  };
  GraphCache() : GraphCache(Options{}) {}
  explicit GraphCache(const Options& options) : options_(options) {}
  ~GraphCache() { Clear(); }
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;

  // One step of this signature: replays its graph, or captures `enqueue` (the step's launches, nothing
  // that synchronizes) into a new one and launches it, or calls `enqueue` eagerly. A capture CUDA refuses
  // falls back to an eager call (and that signature is not captured again).
  absl::Status Run(const std::vector<int64_t>& signature, cudaStream_t stream, const std::function<absl::Status()>& enqueue);
  // A step not eligible for a graph (counted, nothing cached).
  void CountEager() { ++stats_.eager; }
  // Destroys every graph: the device memory their launches point at is being freed or moved.
  void Clear();
  // Clear() when `epoch` (a counter of reallocations of that memory) differs from the last one given.
  void SetEpoch(uint64_t epoch) {
    if (epoch == epoch_) return;
    if (!entries_.empty()) ++stats_.invalidations;
    Clear();
    epoch_ = epoch;
  }
  // New bounds (drops every graph).
  void Configure(const Options& options) {
    Clear();
    options_ = options;
  }
  GraphStats stats() const {
    GraphStats s = stats_;
    s.cached = graphs_;
    return s;
  }

 private:
  struct Entry {
    std::vector<int64_t> signature;
    int sightings = 0;
    bool uncapturable = false;
    cudaGraphExec_t exec = nullptr;
  };
  using List = std::list<Entry>;
  void Erase(List::iterator it);
  // Evicts least recently used entries (not `keep`) until there is room for one more graph and signature.
  void MakeRoom(List::iterator keep, bool for_graph);
  absl::Status Capture(Entry& entry, cudaStream_t stream, const std::function<absl::Status()>& enqueue);

  Options options_;
  List entries_;  // most recently used first
  std::map<std::vector<int64_t>, List::iterator> index_;
  int64_t graphs_ = 0;
  uint64_t epoch_ = 0;
  GraphStats stats_;
};

// n rounded up to a multiple of max(min_step, 2^floor(log2 n) / 8) (at most 12.5% above n once n passes
// 8 * min_step): sizes that creep step by step stay in one bucket for many steps. 0 stays 0.
int64_t BucketUp(int64_t n, int64_t min_step);

}  // namespace tandem::model::cuda
