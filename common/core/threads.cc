#include "common/core/threads.h"

#include <algorithm>
#include <memory>

namespace tandem {

ThreadPool::ThreadPool(int num_threads) {
  const int workers = std::max(0, num_threads - 1);
  workers_.reserve(workers);
  for (int i = 0; i < workers; ++i) workers_.emplace_back([this, i] { WorkerLoop(i + 1); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  work_ready_.notify_all();
  for (auto& worker : workers_) worker.join();
}

namespace {
void RunShare(int64_t count, int shares, int index, const std::function<void(int64_t, int64_t)>& body) {
  const int64_t begin = count * index / shares;
  const int64_t end = count * (index + 1) / shares;
  if (begin < end) body(begin, end);
}
}  // namespace

void ThreadPool::ParallelFor(int64_t count, const std::function<void(int64_t, int64_t)>& body) {
  if (count <= 0) return;
  std::unique_lock<std::mutex> lock(mutex_);
  if (workers_.empty() || count == 1 || busy_) {
    lock.unlock();
    body(0, count);
    return;
  }
  busy_ = true;
  body_ = &body;
  count_ = count;
  pending_ = static_cast<int>(workers_.size());
  ++generation_;
  lock.unlock();
  work_ready_.notify_all();
  RunShare(count, num_threads(), 0, body);
  lock.lock();
  work_done_.wait(lock, [this] { return pending_ == 0; });
  body_ = nullptr;
  busy_ = false;
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    work_ready_.wait(lock, [&] { return stopping_ || generation_ != seen; });
    if (stopping_) return;
    seen = generation_;
    const auto* body = body_;
    const int64_t count = count_;
    lock.unlock();
    RunShare(count, num_threads(), index, *body);
    lock.lock();
    if (--pending_ == 0) work_done_.notify_one();
  }
}

namespace {
std::mutex g_pool_mutex;
std::unique_ptr<ThreadPool> g_pool;
int g_threads = 0;
}  // namespace

void SetNumThreads(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (g_pool && g_threads == num_threads) return;
  g_pool = std::make_unique<ThreadPool>(num_threads);
  g_threads = num_threads;
}

int NumThreads() {
  DefaultPool();
  return g_threads;
}

ThreadPool& DefaultPool() {
  {
    std::lock_guard<std::mutex> lock(g_pool_mutex);
    if (g_pool) return *g_pool;
  }
  SetNumThreads(0);
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  return *g_pool;
}

}  // namespace tandem
