// The demo sign-in page's script, served from the asset host (static.idp.airlock.test).
// Like a real login page's, it renders the single sign-on button: without the script the
// page has no SSO button and says nothing about its checks.
(function () {
  "use strict";
  var sso = document.getElementById("sso");
  if (sso) { sso.hidden = false; }
  var ready = document.getElementById("ready");
  if (ready) { ready.textContent = "\u2713 Sign-in checks passed"; }
  document.documentElement.setAttribute("data-script", "ran");
})();
