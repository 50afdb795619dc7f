// The viewer page's notice that the egress policy blocked part of the remote page: so a
// person whose login page looks broken knows it is not their password. Fed by the
// `egress` event of the viewer's events stream ({blocked: connections, hosts: [...]});
// the browser's own background noise never comes here.

export function showEgressNotice(data) {
  if (!data || !data.blocked) return;
  let el = document.getElementById("egress-notice");
  if (!el) {
    el = document.createElement("p");
    el.id = "egress-notice";
    el.className = "egress-notice";
    el.setAttribute("role", "alert");
    const status = document.getElementById("status");
    status.insertAdjacentElement("afterend", el);
  }
  const hosts = (data.hosts || []).slice(0, 3).join(", ");
  const more = (data.hosts || []).length > 3 ? ", …" : "";
  el.textContent = "Part of this page was blocked by policy" + (hosts ? ` (${hosts}${more})` : "")
    + ": if it looks broken, it is not your password.";
  el.title = el.textContent;
}
