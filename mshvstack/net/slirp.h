/* mshvstack: the part of libslirp's public API (libslirp.h, 4.7: SlirpConfig
 * version 4) this project calls, declared for cffi's ABI mode (dlopen).
 * Written from the library's documented interface; plain declarations only
 * (cffi's cdef takes no preprocessor).  Field order and types are the ABI:
 * they must match the library's header exactly. */

typedef struct Slirp Slirp;

/* glibc's: network-order 32-bit address; 16 bytes aligned to 4 */
struct in_addr { uint32_t s_addr; };
struct in6_addr { uint32_t s6_addr32[4]; };

enum {
    SLIRP_POLL_IN = 1,
    SLIRP_POLL_OUT = 2,
    SLIRP_POLL_PRI = 4,
    SLIRP_POLL_ERR = 8,
    SLIRP_POLL_HUP = 16,
};

typedef ssize_t (*SlirpWriteCb)(const void *buf, size_t len, void *opaque);
typedef void (*SlirpTimerCb)(void *opaque);
typedef int (*SlirpAddPollCb)(int fd, int events, void *opaque);
typedef int (*SlirpGetREventsCb)(int idx, void *opaque);

typedef struct SlirpCb {
    SlirpWriteCb send_packet;
    void (*guest_error)(const char *msg, void *opaque);
    int64_t (*clock_get_ns)(void *opaque);
    void *(*timer_new)(SlirpTimerCb cb, void *cb_opaque, void *opaque);
    void (*timer_free)(void *timer, void *opaque);
    void (*timer_mod)(void *timer, int64_t expire_time_ms, void *opaque);
    void (*register_poll_fd)(int fd, void *opaque);
    void (*unregister_poll_fd)(int fd, void *opaque);
    void (*notify)(void *opaque);
    void (*init_completed)(Slirp *slirp, void *opaque);
    void *(*timer_new_opaque)(int timer_id, void *cb_opaque, void *opaque);
} SlirpCb;

typedef struct SlirpConfig {
    uint32_t version;
    int restricted;
    bool in_enabled;
    struct in_addr vnetwork;
    struct in_addr vnetmask;
    struct in_addr vhost;
    bool in6_enabled;
    struct in6_addr vprefix_addr6;
    uint8_t vprefix_len;
    struct in6_addr vhost6;
    const char *vhostname;
    const char *tftp_server_name;
    const char *tftp_path;
    const char *bootfile;
    struct in_addr vdhcp_start;
    struct in_addr vnameserver;
    struct in6_addr vnameserver6;
    const char **vdnssearch;
    const char *vdomainname;
    size_t if_mtu;
    size_t if_mru;
    bool disable_host_loopback;
    bool enable_emu;
    void *outbound_addr;
    void *outbound_addr6;
    bool disable_dns;
    bool disable_dhcp;
} SlirpConfig;

Slirp *slirp_new(const SlirpConfig *cfg, const SlirpCb *callbacks, void *opaque);
void slirp_cleanup(Slirp *slirp);
void slirp_pollfds_fill(Slirp *slirp, uint32_t *timeout, SlirpAddPollCb add_poll, void *opaque);
void slirp_pollfds_poll(Slirp *slirp, int select_error, SlirpGetREventsCb get_revents, void *opaque);
void slirp_input(Slirp *slirp, const uint8_t *pkt, int pkt_len);
int slirp_add_hostfwd(Slirp *slirp, int is_udp, struct in_addr host_addr, int host_port,
                      struct in_addr guest_addr, int guest_port);
const char *slirp_version_string(void);
