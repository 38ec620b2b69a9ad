// A small fixed thread pool with a blocking ParallelFor, plus the process-wide thread count that the
// CPU kernels (and OpenBLAS, through kernels::SetThreads) honour.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tandem {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, count) into contiguous ranges and runs body(begin, end) on them; the caller's thread
  // takes a share. Returns when every range is done. Not reentrant: nested calls run inline.
  void ParallelFor(int64_t count, const std::function<void(int64_t, int64_t)>& body);

 private:
  void WorkerLoop(int index);

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  const std::function<void(int64_t, int64_t)>* body_ = nullptr;
  int64_t count_ = 0;
  uint64_t generation_ = 0;
  int pending_ = 0;
  bool stopping_ = false;
  bool busy_ = false;
};

// Process-wide pool used by the CPU kernels. SetNumThreads(n <= 0) picks the hardware concurrency.
void SetNumThreads(int num_threads);
int NumThreads();
ThreadPool& DefaultPool();

inline void ParallelFor(int64_t count, const std::function<void(int64_t, int64_t)>& body) {
  DefaultPool().ParallelFor(count, body);
}

}  // namespace tandem
