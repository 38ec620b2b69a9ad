#include "common/model/cuda/device_graphs.h"

#include <algorithm>
#include <iterator>

#include <spdlog/spdlog.h>

#include "common/kernels/cuda/check.h"

namespace tandem::model::cuda {

int64_t BucketUp(int64_t n, int64_t min_step) {
  if (n <= 0) return 0;
  int64_t top = 1;
  while (top <= n / 2) top *= 2;  // the largest power of two <= n
  const int64_t step = std::max<int64_t>(std::max<int64_t>(min_step, 1), top / 8);
  return (n + step - 1) / step * step;
}

absl::Status GraphCache::Run(const std::vector<int64_t>& signature, cudaStream_t stream,
                             const std::function<absl::Status()>& enqueue) {
  List::iterator it;
  if (const auto found = index_.find(signature); found != index_.end()) {
    it = found->second;
    entries_.splice(entries_.begin(), entries_, it);  // most recently used; iterators stay valid
  } else {
    MakeRoom(entries_.end(), /*for_graph=*/false);
    entries_.push_front(Entry{signature});
    it = entries_.begin();
    index_.emplace(signature, it);
  }
  Entry& entry = *it;
  ++entry.sightings;
  if (entry.exec) {
    TANDEM_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(entry.exec, stream));
    ++stats_.replays;
    return absl::OkStatus();
  }
  if (entry.uncapturable || entry.sightings < options_.capture_after) {
    ++stats_.eager;
    return enqueue();
  }
  MakeRoom(it, /*for_graph=*/true);
  return Capture(entry, stream, enqueue);
}

absl::Status GraphCache::Capture(Entry& entry, cudaStream_t stream, const std::function<absl::Status()>& enqueue) {
  // Thread-local mode: other threads of the process (pool copies, transfers) may keep calling CUDA.
  if (const cudaError_t began = cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal); began != cudaSuccess) {
    (void)cudaGetLastError();
    entry.uncapturable = true;
    ++stats_.capture_failures;
    ++stats_.eager;
    spdlog::warn("CUDA graph capture of a forward step could not begin ({}): that step shape runs without a graph",
                 cudaGetErrorString(began));
    return enqueue();
  }
  const absl::Status launched = enqueue();
  cudaGraph_t graph = nullptr;
  const cudaError_t ended = cudaStreamEndCapture(stream, &graph);  // always, so the stream leaves capture mode
  cudaGraphExec_t exec = nullptr;
  cudaError_t instantiated = cudaSuccess;
  if (launched.ok() && ended == cudaSuccess && graph) instantiated = cudaGraphInstantiate(&exec, graph, 0);
  if (graph) cudaGraphDestroy(graph);
  if (!launched.ok() || ended != cudaSuccess || instantiated != cudaSuccess || !exec) {
    if (exec) cudaGraphExecDestroy(exec);
    (void)cudaGetLastError();  // capture errors are not sticky: clear the last one before the eager launches
    entry.uncapturable = true;
    ++stats_.capture_failures;
    ++stats_.eager;
    if (stats_.capture_failures == 1) {
      spdlog::warn("CUDA graph capture of a forward step failed ({}; end capture: {}; instantiate: {}): that step "
                   "shape runs without a graph",
                   launched.ToString(), cudaGetErrorString(ended), cudaGetErrorString(instantiated));
    }
    // Nothing ran while capturing: the step runs eagerly (and fails there with its reason if it is bad).
    return enqueue();
  }
  entry.exec = exec;
  ++graphs_;
  ++stats_.captures;
  TANDEM_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(exec, stream));
  return absl::OkStatus();
}

void GraphCache::Erase(List::iterator it) {
  if (it->exec) {
    cudaGraphExecDestroy(it->exec);  // a launch still in flight completes first (freed asynchronously)
    --graphs_;
  }
  index_.erase(it->signature);
  entries_.erase(it);
}

void GraphCache::MakeRoom(List::iterator keep, bool for_graph) {
  if (!for_graph) {
    while (!entries_.empty() && static_cast<int>(entries_.size()) >= options_.max_signatures) {
      const auto last = std::prev(entries_.end());
      if (last->exec) ++stats_.evictions;
      Erase(last);
    }
    return;
  }
  while (graphs_ >= options_.max_graphs) {
    auto victim = entries_.end();
    for (auto it = entries_.end(); it != entries_.begin();) {
      --it;
      if (it != keep && it->exec) {
        victim = it;
        break;
      }
    }
    if (victim == entries_.end()) return;
    ++stats_.evictions;
    Erase(victim);
  }
}

void GraphCache::Clear() {
  for (Entry& e : entries_) {
    if (e.exec) cudaGraphExecDestroy(e.exec);
  }
  entries_.clear();
  index_.clear();
  graphs_ = 0;
}

}  // namespace tandem::model::cuda
