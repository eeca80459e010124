/* A stand-in for the NVIDIA driver's libnvidia-ml.so.1, for the in-image checks on a build host without a GPU
 * (images/check_image.py mounts it where the container toolkit puts the driver's libraries). vLLM picks its
 * platform through NVML: with no driver, `vllm serve --help` stops at "Failed to infer device type". This
 * reports one GPU of compute capability TQ_STUB_NVML_CC (default "8.6") and nothing else; no CUDA call works.
 * Build: gcc -shared -fPIC -O2 -o libnvidia-ml.so.1 nvml-stub.c */
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t; /* NVML_SUCCESS = 0 */
typedef void *nvmlDevice_t;

nvmlReturn_t nvmlInit(void) { return 0; }
nvmlReturn_t nvmlInit_v2(void) { return 0; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return 0; }
nvmlReturn_t nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(nvmlReturn_t result) { (void)result; return "tqstack NVML stub"; }
nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { *count = 1; return 0; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { *count = 1; return 0; }
nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
  *device = (nvmlDevice_t)(size_t)(index + 1);
  return index == 0 ? 0 : 2; /* 2 = NVML_ERROR_INVALID_ARGUMENT */
}
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
  return nvmlDeviceGetHandleByIndex(index, device);
}
nvmlReturn_t nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor) {
  (void)device;
  const char *cc = getenv("TQ_STUB_NVML_CC");
  if (cc == NULL) cc = "8.6";
  *major = atoi(cc);
  const char *dot = strchr(cc, '.');
  *minor = dot ? atoi(dot + 1) : 0;
  return 0;
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
  (void)device;
  strncpy(name, "tqstack NVML stub", length);
  if (length) name[length - 1] = '\0';
  return 0;
}
