/* cpu.c: placeholder table while the CPU kernels are written; every call reports unsupported. */
#include "kernels.h"
static da_status_t sup(const da_kparams_t *p) {
  DA_CHECK(da_kparams_check(p));
  return DA_ERR(DA_ERR_UNSUPPORTED, "cpu kernels not built yet");
}
const da_kernels_t da_kernels_cpu = {.name = "cpu", .supports = sup};
