// Safetensors reading and writing: strict header validation, mmap'd files, sharded checkpoints through
// model.safetensors.index.json, optional page-cache drop after load, and a writer for fixtures.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "common/core/dtype.h"
#include "common/core/status.h"
#include "common/core/tensor.h"

namespace tandem::model {

struct TensorInfo {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data buffer
  uint64_t end = 0;
};

// One mmap'd .safetensors file. Open() validates the whole header before anything is read:
// header length sane (8 bytes + N <= file size, N <= 100 MiB), UTF-8 JSON object, known dtypes,
// dtype x shape == byte size (overflow-checked), offsets inside the data buffer, sorted ranges
// that neither overlap nor leave holes. Errors name the file and, where one is involved, the tensor.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return file_size_; }

  // The tensor's bytes inside the mapping (valid until Unmap()).
  absl::StatusOr<std::span<const uint8_t>> Data(const std::string& name) const;
  // Unmaps the file; with drop_cache also posix_fadvise(DONTNEED) on it (logs once if unsupported).
  void Unmap(bool drop_cache);
  bool mapped() const { return base_ != nullptr; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  uint64_t file_size_ = 0;
  uint64_t data_start_ = 0;
  const uint8_t* base_ = nullptr;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

struct CheckpointOptions {
  bool drop_cache_after_load = false;
  // Progress display: a bar on a TTY, a line every ~10% otherwise; off for tests.
  bool show_progress = true;
};

// A checkpoint directory: model.safetensors.index.json when present (only the shards it names are
// opened, each tensor found in exactly the shard the index says), otherwise every *.safetensors file
// in sorted order (a tensor present in two files is an error).
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& dir, CheckpointOptions options = {});
  ~Checkpoint();

  bool Has(const std::string& name) const;
  absl::StatusOr<TensorInfo> Info(const std::string& name) const;
  // Copies a tensor out of its shard, checking dtype and shape first ("file F: tensor T: expected
  // dtype BF16 shape [4, 8], found F32 [4, 8]"). Marks it consumed; when every tensor of a shard has
  // been consumed the shard is unmapped (and dropped from the page cache when asked).
  absl::StatusOr<Tensor> Load(const std::string& name, DType dtype, const std::vector<int64_t>& shape);
  // Unmaps every shard still mapped (call once all wanted tensors are loaded).
  void Finish();

  std::vector<std::string> TensorNames() const;
  std::vector<std::string> FilePaths() const;
  uint64_t total_bytes() const { return total_bytes_; }

 private:
  Checkpoint() = default;
  struct Shard;
  std::string dir_;
  CheckpointOptions options_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::map<std::string, size_t> tensor_shard_;
  uint64_t total_bytes_ = 0;
  uint64_t loaded_bytes_ = 0;
  int last_progress_decile_ = -1;
  void ReportProgress();
};

// Writer for fixtures and the model generator.
class SafetensorsWriter {
 public:
  void Add(const std::string& name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
  void Add(const std::string& name, const Tensor& tensor);
  size_t pending_bytes() const;
  // Writes one file (header padded with spaces to a multiple of 8) and clears the writer.
  absl::Status Write(const std::string& path, const std::map<std::string, std::string>& metadata = {});
  std::vector<std::string> names() const;

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  absl::Status error_;  // first bad Add(), reported by Write()
};

// Writes tensors (in the given order) as shards of at most shard_bytes named
// model-0000i-of-0000n.safetensors plus model.safetensors.index.json.
absl::Status WriteShardedCheckpoint(const std::string& dir, std::vector<std::pair<std::string, Tensor>> tensors,
                                    uint64_t shard_bytes);

}  // namespace tandem::model
