#include "common/cache/radix_cache.h"

#include <algorithm>
#include <queue>

namespace tandem::cache {

bool RadixCache::PageLess::operator()(std::span<const int32_t> a, std::span<const int32_t> b) const {
  return std::lexicographical_compare(a.begin(), a.end(), b.begin(), b.end());
}

RadixCache::RadixCache(StatePools* pools)
    : pools_(pools), page_size_(pools->page_size()), root_(std::make_unique<Node>()) {}

RadixCache::~RadixCache() { ReleaseSubtree(*root_); }

std::span<const int32_t> RadixCache::page_of(std::span<const int32_t> tokens, int64_t page) const {
  return tokens.subspan(static_cast<size_t>(page * page_size_), static_cast<size_t>(page_size_));
}

RadixCache::Node* RadixCache::FindChild(Node* node, std::span<const int32_t> first_page) {
  auto it = node->children.find(first_page);
  return it == node->children.end() ? nullptr : it->second.get();
}

int64_t RadixCache::MatchingPages(const Node& node, std::span<const int32_t> tokens, int64_t first_page) const {
  const int64_t available = static_cast<int64_t>(tokens.size()) / page_size_ - first_page;
  int64_t k = 0;
  for (; k < std::min(node.num_pages(), available); ++k) {
    const auto want = page_of(tokens, first_page + k);
    const auto have = page_of(node.tokens, k);
    if (!std::equal(want.begin(), want.end(), have.begin())) break;
  }
  return k;
}

RadixCache::Node* RadixCache::Split(Node* node, int64_t pages) {
  Node* parent = node->parent;
  auto it = parent->children.find(page_of(node->tokens, 0));
  std::unique_ptr<Node> suffix = std::move(it->second);
  auto prefix = std::make_unique<Node>();
  const auto cut = static_cast<std::ptrdiff_t>(pages * page_size_);
  prefix->parent = parent;
  prefix->tokens.assign(node->tokens.begin(), node->tokens.begin() + cut);
  prefix->pages.assign(node->pages.begin(), node->pages.begin() + pages);
  prefix->snapshots.assign(std::make_move_iterator(node->snapshots.begin()),
                           std::make_move_iterator(node->snapshots.begin() + pages));
  // Locks taken on the suffix cover its ancestors, which now include the prefix.
  prefix->lock_ref = node->lock_ref;
  prefix->last_access = node->last_access;
  node->tokens.erase(node->tokens.begin(), node->tokens.begin() + cut);
  node->pages.erase(node->pages.begin(), node->pages.begin() + pages);
  node->snapshots.erase(node->snapshots.begin(), node->snapshots.begin() + pages);
  node->parent = prefix.get();
  std::vector<int32_t> key(node->tokens.begin(), node->tokens.begin() + static_cast<std::ptrdiff_t>(page_size_));
  prefix->children.emplace(std::move(key), std::move(suffix));
  it->second = std::move(prefix);  // same first page, same key
  return it->second.get();
}

RadixCache::Match RadixCache::MatchPrefix(std::span<const int32_t> tokens) {
  Match match;
  const int64_t n = static_cast<int64_t>(tokens.size()) / page_size_;
  const uint64_t now = ++clock_;
  std::vector<PageId> path;
  Node* node = root_.get();
  int64_t pos = 0;
  while (pos < n) {
    Node* child = FindChild(node, page_of(tokens, pos));
    if (!child) break;
    const int64_t k = MatchingPages(*child, tokens, pos);
    child->last_access = now;
    for (int64_t i = 0; i < k; ++i) {
      path.push_back(child->pages[static_cast<size_t>(i)]);
      if (const auto& snapshot = child->snapshots[static_cast<size_t>(i)]) {
        match.tokens = (pos + i + 1) * page_size_;
        match.snapshot = *snapshot;
        match.node = NodeRef(child);
      }
    }
    pos += k;
    if (k < child->num_pages()) break;
    node = child;
  }
  match.matched_tokens = pos * page_size_;
  path.resize(static_cast<size_t>(match.tokens / page_size_));
  match.pages = std::move(path);
  return match;
}

void RadixCache::Lock(NodeRef ref) {
  for (Node* node = ref.node_; node && node != root_.get(); node = node->parent) ++node->lock_ref;
}

absl::Status RadixCache::Unlock(NodeRef ref) {
  if (!ref.valid()) return absl::InvalidArgumentError("radix cache: unlock of an empty node reference");
  for (Node* node = ref.node_; node && node != root_.get(); node = node->parent) {
    if (node->lock_ref <= 0) return absl::FailedPreconditionError("radix cache: unlock of a node that is not locked");
  }
  for (Node* node = ref.node_; node && node != root_.get(); node = node->parent) --node->lock_ref;
  return absl::OkStatus();
}

absl::StatusOr<int64_t> RadixCache::Insert(std::span<const int32_t> tokens, std::span<const PageId> pages,
                                           std::vector<BoundarySnapshot> snapshots) {
  const int64_t n = static_cast<int64_t>(pages.size());
  // Snapshots are ours from here on, whatever happens.
  auto release_all = [&](absl::Status error) -> absl::Status {
    for (auto& snapshot : snapshots) pools_->ReleaseSnapshot(snapshot).IgnoreError();
    return error;
  };
  if (static_cast<int64_t>(tokens.size()) != n * page_size_) {
    return release_all(absl::InvalidArgumentError(absl::StrCat("radix cache: insert of ", tokens.size(), " tokens with ", n,
                                                               " pages of ", page_size_, " tokens")));
  }
  for (PageId page : pages) {
    if (pools_->token_pages().refcount(page) == 0) {
      return release_all(absl::InvalidArgumentError(absl::StrCat("radix cache: insert of page ", page, ", which is not allocated")));
    }
  }
  std::vector<std::optional<BoundarySnapshot>> offered(static_cast<size_t>(n));
  for (auto& snapshot : snapshots) {
    const int64_t boundary = snapshot.length / page_size_;
    if (snapshot.length % page_size_ != 0 || boundary < 1 || boundary > n || offered[static_cast<size_t>(boundary - 1)]) {
      return release_all(absl::InvalidArgumentError(absl::StrCat("radix cache: snapshot at length ", snapshot.length,
                                                                 " is not a distinct page boundary of the ", n * page_size_,
                                                                 " inserted tokens")));
    }
    offered[static_cast<size_t>(boundary - 1)] = snapshot;
  }
  snapshots.clear();  // now tracked in `offered`

  const uint64_t now = ++clock_;
  int64_t added = 0;
  Node* node = root_.get();
  int64_t pos = 0;
  while (pos < n) {
    Node* child = FindChild(node, page_of(tokens, pos));
    if (!child) {
      auto fresh = std::make_unique<Node>();
      fresh->parent = node;
      fresh->tokens.assign(tokens.begin() + static_cast<std::ptrdiff_t>(pos * page_size_), tokens.end());
      fresh->pages.assign(pages.begin() + pos, pages.end());
      fresh->snapshots.assign(std::make_move_iterator(offered.begin() + pos), std::make_move_iterator(offered.end()));
      for (int64_t i = pos; i < n; ++i) offered[static_cast<size_t>(i)].reset();
      fresh->last_access = now;
      pools_->token_pages().AddRef(fresh->pages).IgnoreError();  // checked live above
      std::vector<int32_t> key(fresh->tokens.begin(), fresh->tokens.begin() + static_cast<std::ptrdiff_t>(page_size_));
      node->children.emplace(std::move(key), std::move(fresh));
      added = (n - pos) * page_size_;
      break;
    }
    int64_t k = MatchingPages(*child, tokens, pos);
    if (k < child->num_pages()) child = Split(child, k);
    for (int64_t i = 0; i < k; ++i) {
      auto& have = child->snapshots[static_cast<size_t>(i)];
      auto& give = offered[static_cast<size_t>(pos + i)];
      if (!have && give) {
        have = give;
        give.reset();
      }
    }
    child->last_access = now;
    node = child;
    pos += k;
  }
  for (auto& give : offered) {
    if (give) pools_->ReleaseSnapshot(*give).IgnoreError();
  }
  return added;
}

void RadixCache::ReleaseNode(Node& node) {
  pools_->token_pages().Release(node.pages).IgnoreError();
  for (auto& snapshot : node.snapshots) {
    if (snapshot) pools_->ReleaseSnapshot(*snapshot).IgnoreError();
  }
  node.pages.clear();
  node.snapshots.clear();
  node.tokens.clear();
}

void RadixCache::ReleaseSubtree(Node& node) {
  for (auto& [key, child] : node.children) ReleaseSubtree(*child);
  node.children.clear();
  ReleaseNode(node);
}

RadixCache::EvictResult RadixCache::Evict(int64_t min_free_token_pages, int64_t min_free_window_pages) {
  EvictResult result;
  PageAllocator& token_pages = pools_->token_pages();
  PageAllocator& window_pages = pools_->window_pages();
  const int64_t token_free_before = token_pages.free(), window_free_before = window_pages.free();
  auto satisfied = [&] { return token_pages.free() >= min_free_token_pages && window_pages.free() >= min_free_window_pages; };
  auto older = [](const Node* a, const Node* b) { return a->last_access > b->last_access; };
  std::priority_queue<Node*, std::vector<Node*>, decltype(older)> leaves(older);
  auto collect = [&](auto&& self, Node* node) -> void {
    for (auto& [key, child] : node->children) self(self, child.get());
    if (node != root_.get() && node->children.empty() && node->lock_ref == 0) leaves.push(node);
  };
  if (!satisfied()) collect(collect, root_.get());
  while (!satisfied() && !leaves.empty()) {
    Node* leaf = leaves.top();
    leaves.pop();
    // Trim from the tail, a page (and the snapshot after it) at a time.
    while (leaf->num_pages() > 0 && !satisfied()) {
      token_pages.Release(leaf->pages.back()).IgnoreError();
      leaf->pages.pop_back();
      leaf->tokens.resize(leaf->tokens.size() - static_cast<size_t>(page_size_));
      if (auto& snapshot = leaf->snapshots.back()) pools_->ReleaseSnapshot(*snapshot).IgnoreError();
      leaf->snapshots.pop_back();
    }
    if (leaf->num_pages() > 0) break;  // satisfied
    Node* parent = leaf->parent;
    for (auto it = parent->children.begin(); it != parent->children.end(); ++it) {
      if (it->second.get() == leaf) {
        parent->children.erase(it);
        break;
      }
    }
    ++result.nodes;
    if (parent != root_.get() && parent->children.empty() && parent->lock_ref == 0) leaves.push(parent);
  }
  result.token_pages_freed = token_pages.free() - token_free_before;
  result.window_pages_freed = window_pages.free() - window_free_before;
  return result;
}

RadixCache::Stats RadixCache::stats() const {
  Stats stats;
  auto walk = [&](auto&& self, const Node* node) -> void {
    for (const auto& [key, child] : node->children) {
      ++stats.nodes;
      stats.cached_pages += child->num_pages();
      stats.cached_tokens += static_cast<int64_t>(child->tokens.size());
      for (const auto& snapshot : child->snapshots) stats.snapshots += snapshot ? 1 : 0;
      stats.locked_nodes += child->lock_ref > 0 ? 1 : 0;
      self(self, child.get());
    }
  };
  walk(walk, root_.get());
  return stats;
}

}  // namespace tandem::cache
